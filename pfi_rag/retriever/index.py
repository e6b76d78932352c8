"""The FAISS side of a client's store: stable chunk ids over flat, HNSW or IVF search.

Every index is an ``IndexIDMap2`` so a vector keeps its chunk id (the docstore's primary key)
through removals and rebuilds. Vectors are L2-normalised, so inner product is cosine.

Which structure a client uses follows ``retrieval.index``:

- ``flat``: exact ``IndexFlatIP`` always;
- ``auto``: flat until the client holds ``auto_ann_threshold`` chunks, then HNSW;
- ``hnsw``: HNSW from the first chunk;
- ``ivf``: flat until there is enough data to train the coarse quantizer (``IVF_MIN_TRAIN``),
  then IVF with ``nlist ~ 4 sqrt(n)``, retrained when the client has grown about 4x.

Removal: HNSW cannot remove single vectors, and IVF can but renumbers nothing, so the
``IndexIDMap2`` id table would no longer line up with it (measured: wrong ids returned). For
both, a removal re-adds the vectors the index still holds (IVF keeps its trained quantizer,
HNSW rebuilds its graph, O(n log n)); per-client indexes are small enough for that to be rare
and cheap next to re-embedding. Flat removes in place.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

from pfi_rag.config import RetrievalConfig
from pfi_rag.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

IVF_MIN_TRAIN = 4096  # FAISS wants ~39 training points per list; below this IVF is not worth it


def desired_kind(cfg: RetrievalConfig, n: int) -> str:
    if cfg.index == "flat":
        return "flat"
    if cfg.index == "hnsw":
        return "hnsw"
    if cfg.index == "ivf":
        return "ivf" if n >= IVF_MIN_TRAIN else "flat"
    return "hnsw" if n >= cfg.auto_ann_threshold else "flat"


def ivf_nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build(
    cfg: RetrievalConfig, dim: int, kind: str, vectors: np.ndarray, ids: np.ndarray
) -> faiss.IndexIDMap2:
    """A fresh index of ``kind`` holding ``vectors`` under ``ids`` (trained if it needs it)."""
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = cfg.hnsw_ef_construction
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, ivf_nlist(len(vectors)), faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index = faiss.IndexIDMap2(inner)
    tune(index, cfg)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index


def kind_of(index: faiss.IndexIDMap2) -> str:
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    return "flat"


def tune(index: faiss.IndexIDMap2, cfg: RetrievalConfig) -> None:
    """Apply the search-time parameters (not stored in the file, so set on every load)."""
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = cfg.hnsw_ef_search
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = cfg.ivf_nprobe


def ids_of(index: faiss.IndexIDMap2) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def vectors_of(index: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, vectors) the index holds, read back from its storage."""
    ids = ids_of(index)
    if len(ids) == 0:
        return ids, np.zeros((0, index.d), dtype=np.float32)
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVF):
        inner.make_direct_map()
    vectors = inner.reconstruct_n(0, inner.ntotal)
    return ids, np.ascontiguousarray(vectors, dtype=np.float32)


def remove(index: faiss.IndexIDMap2, cfg: RetrievalConfig, ids: np.ndarray) -> faiss.IndexIDMap2:
    """Remove ``ids``; returns the index to use afterwards."""
    if len(ids) == 0:
        return index
    if kind_of(index) == "flat":
        index.remove_ids(np.asarray(ids, dtype=np.int64))
        return index
    held, vectors = vectors_of(index)
    keep = ~np.isin(held, ids)
    index.reset()  # keeps the IVF's trained quantizer; HNSW's graph is rebuilt by the adds
    index.add_with_ids(vectors[keep], held[keep])
    return index


def fit(index: faiss.IndexIDMap2, cfg: RetrievalConfig) -> faiss.IndexIDMap2:
    """Switch structure when the client's size calls for another one (or IVF needs retraining)."""
    n = index.ntotal
    want, have = desired_kind(cfg, n), kind_of(index)
    stale_ivf = have == "ivf" and ivf_nlist(n) >= 2 * faiss.downcast_index(index.index).nlist
    if want == have and not stale_ivf:
        return index
    logger.info("rebuilding a %d-vector index: %s -> %s", n, have, want)
    ids, vectors = vectors_of(index)
    return build(cfg, index.d, want, vectors, ids)


def save(index: faiss.IndexIDMap2, path: Path) -> None:
    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


def load(path: Path, cfg: RetrievalConfig) -> faiss.IndexIDMap2 | None:
    """The saved index, or None when there is none (the docstore can rebuild it)."""
    if not path.is_file():
        return None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        logger.warning("unreadable index %s (%s); rebuilding from the docstore", path, exc)
        return None
    if not isinstance(index, faiss.IndexIDMap2):
        logger.warning("%s is not an IndexIDMap2; rebuilding from the docstore", path)
        return None
    tune(index, cfg)
    return index


def search(
    index: faiss.IndexIDMap2, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of shape (Q, k); id -1 pads when fewer than k vectors qualify."""
    if allowed is None:
        return index.search(queries, k)
    selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    elif isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=params)
