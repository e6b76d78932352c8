"""The retriever against the raw libraries it wraps, measured in one run.

    .venv/bin/python bench/retriever.py [--repeats 5] [--queries 200] [--skip-100k]

1. Ingest throughput: ``ClientStore.add_documents`` (chunking, embedding, SQLite commits,
   FAISS add, atomic index write) vs plain ``SentenceTransformer.encode`` + ``index.add`` on
   the same synthetic texts (target: within 1.2x).
2. Single-query search latency at 10k and 100k chunks: ``store.search_vectors`` (FAISS search
   + docstore fetch of the hits) vs ``index.search`` on the store's own index object (target:
   within 1.1x). Random unit vectors stand in for embeddings (a deterministic fake embedder),
   so this part measures the store, not the model; query embedding time is reported apart.
3. Memory per 10k chunks: FAISS index bytes, docstore bytes on disk, process RSS growth.
4. Recall@10 of HNSW and IVF (the configured parameters) against exact flat search at 100k.

Medians of repeated runs; the machines are shared, so read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

from pfi_rag.config import ModelsConfig, RetrievalConfig
from pfi_rag.data.records import Document, load_client_data
from pfi_rag.data.synth import client_ids, synthesize
from pfi_rag.models.loading import load_embedder
from pfi_rag.retriever import ClientStore
from pfi_rag.retriever import index as vindex

DIM = 384


class RandomEmbedder:
    """Unit vectors from a hash of each text: the embedder interface without the model's cost."""

    max_seq_length = 256

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def get_embedding_dimension(self) -> int:
        return DIM

    def encode(self, texts, batch_size=64, **_):
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            out[row] = np.random.default_rng(seed).standard_normal(DIM)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def synthetic_texts(directory: Path, clients: int) -> list[Document]:
    synthesize(directory, clients=clients, seed=0)
    docs = []
    for client in client_ids(clients):
        docs.extend(load_client_data(directory, client).documents)
    return docs


def bench_ingest(embedder, docs: list[Document], repeats: int) -> None:
    cfg = RetrievalConfig(index="flat")
    texts = [doc.text for doc in docs]
    ids = np.arange(len(texts), dtype=np.int64)
    plain, ours = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        vectors = embedder.encode(texts, batch_size=cfg.embed_batch_size, normalize_embeddings=True)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        index.add_with_ids(np.asarray(vectors, dtype=np.float32), ids)
        plain.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as root:
            with ClientStore.open(root, "bench", cfg, embedder) as store:
                started = time.perf_counter()
                report = store.add_documents(docs)
                ours.append(time.perf_counter() - started)
            assert report.chunks == len(docs), "bench texts must be one chunk each to compare like for like"
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"ingest, {len(docs)} texts, median of {repeats}:")
    print(f"  plain encode + index.add   {p:7.2f} s  {len(docs) / p:7.1f} texts/s")
    print(f"  ClientStore.add_documents  {o:7.2f} s  {len(docs) / o:7.1f} texts/s")
    print(f"  ratio pfi-rag / plain      {o / p:7.3f}x   (target <= 1.2x)")


def fill_store(root: Path, n: int, tokenizer) -> ClientStore:
    docs = [Document(id=f"c{i}", text=f"chunk {i}") for i in range(n)]
    store = ClientStore.open(root, f"bench-{n}", RetrievalConfig(index="flat"), RandomEmbedder(tokenizer))
    store.add_documents(docs)
    return store


def per_query_median(search, queries: np.ndarray) -> float:
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query[None, :])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_search(tokenizer, sizes: list[int], queries: np.ndarray, repeats: int) -> None:
    process = psutil.Process()
    for n in sizes:
        with tempfile.TemporaryDirectory() as root:
            rss_before = process.memory_info().rss
            started = time.perf_counter()
            store = fill_store(Path(root), n, tokenizer)
            fill_s = time.perf_counter() - started
            rss_growth = process.memory_info().rss - rss_before
            with store:
                index = store._index  # the very index object the store searches
                plain, ours = [], []
                for _ in range(repeats):
                    plain.append(per_query_median(lambda q, index=index: index.search(q, 10), queries))
                    ours.append(per_query_median(lambda q, store=store: store.search_vectors(q, 10), queries))
                stats = store.stats()
                index_bytes = len(faiss.serialize_index(index))
            p, o = statistics.median(plain), statistics.median(ours)
            per10k = 10_000 / n
            print(
                f"search at {n} chunks ({stats['index']}), k=10, "
                f"median per query over {len(queries)} x {repeats}:"
            )
            print(f"  plain index.search         {p * 1e3:8.3f} ms")
            print(f"  store.search_vectors       {o * 1e3:8.3f} ms   ratio {o / p:.3f}x (target <= 1.1x)")
            print(
                f"  memory per 10k chunks: index {index_bytes * per10k / 2**20:.1f} MiB, docstore on disk "
                f"{(stats['disk_bytes'] - index_bytes) * per10k / 2**20:.1f} MiB, process RSS growth "
                f"{rss_growth * per10k / 2**20:.1f} MiB (fill took {fill_s:.1f} s)"
            )


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def bench_ann(n: int, queries: np.ndarray, rng: np.random.Generator) -> None:
    cfg = RetrievalConfig()
    data = rng.standard_normal((n, DIM)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    # Queries near stored chunks, as real questions sit near their answers (noise 0.1 per
    # dimension puts them at cosine ~0.45: lower it for closer queries); and uniformly random
    # ones, the hardest case for a graph or a coarse quantizer.
    near = data[rng.choice(n, len(queries), replace=False)] + 0.1 * rng.standard_normal((len(queries), DIM))
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
    flat = vindex.build(cfg, DIM, "flat", data, ids)
    truth_near, truth_random = flat.search(near, 10)[1], flat.search(queries, 10)[1]
    flat_ms = per_query_median(lambda q: flat.search(q, 10), queries) * 1e3
    print(f"ANN at {n} random unit vectors, recall@10 against flat (flat: {flat_ms:.2f} ms/query):")
    for kind in ("hnsw", "ivf"):
        started = time.perf_counter()
        index = vindex.build(cfg, DIM, kind, data, ids)
        build_s = time.perf_counter() - started
        ms = per_query_median(lambda q, index=index: index.search(q, 10), queries) * 1e3
        r_near = recall_at_10(index.search(near, 10)[1], truth_near)
        r_random = recall_at_10(index.search(queries, 10)[1], truth_random)
        params = (
            f"M={cfg.hnsw_m} efSearch={cfg.hnsw_ef_search}"
            if kind == "hnsw"
            else f"nlist={vindex.ivf_nlist(n)} nprobe={cfg.ivf_nprobe}"
        )
        print(
            f"  {kind:4s} ({params}): recall@10 near-data queries {r_near:.3f}, random queries "
            f"{r_random:.3f}; {ms:.3f} ms/query; built in {build_s:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--ingest-clients", type=int, default=48, help="synthetic clients whose texts to ingest"
    )
    parser.add_argument("--skip-100k", action="store_true", help="only 10k chunks for search; no ANN part")
    args = parser.parse_args()

    embedder = load_embedder(ModelsConfig(device="cpu"))
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    with tempfile.TemporaryDirectory() as directory:
        docs = synthetic_texts(Path(directory), args.ingest_clients)
    bench_ingest(embedder, docs, args.repeats)
    embedder.encode(["Where do I live now?"], normalize_embeddings=True)  # warm-up
    times = []
    for _ in range(20):
        started = time.perf_counter()
        embedder.encode(["Where do I live now?"], normalize_embeddings=True)
        times.append(time.perf_counter() - started)
    print(f"query embedding (one query, all-MiniLM-L6-v2): {statistics.median(times) * 1e3:.1f} ms median")
    sizes = [10_000] if args.skip_100k else [10_000, 100_000]
    bench_search(embedder.tokenizer, sizes, queries, args.repeats)
    if not args.skip_100k:
        bench_ann(100_000, queries, rng)


if __name__ == "__main__":
    main()
