"""``ClientStore``: one client's documents, chunk vectors and FAISS index under ``clients/<id>/index/``.

Files::

    index/docstore.sqlite   documents (every version), chunks, live chunk vectors (SQLite, WAL)
    index/faiss.index       IndexIDMap2 over the live chunks, ids = docstore chunk ids
    index/lock              held (flock) while a process has the store open

Crash safety: each ingest batch is one SQLite transaction; the FAISS file is rewritten
atomically (temp file, fsync, rename) after each call that changed it. A process killed in
between leaves a docstore that is ahead of (or, after a delete, behind) the index file, so
``open`` reconciles the two by chunk id, adding live vectors from the docstore and dropping ids
it no longer holds. After ``open`` the index and the docstore always agree.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pfi_rag import layout
from pfi_rag.config import RetrievalConfig
from pfi_rag.data.records import Document
from pfi_rag.retriever import index as vindex
from pfi_rag.retriever.chunking import Chunk, chunk_text, window_size
from pfi_rag.retriever.docstore import DocStore
from pfi_rag.retriever.embedding import FINGERPRINT_MIN_COSINE, FINGERPRINT_TEXT, dimension, embed, max_tokens
from pfi_rag.retriever.records import (
    EmbedderMismatch,
    Hit,
    IngestReport,
    RetrieverError,
    StoreBusy,
    StoredDocument,
)
from pfi_rag.retriever.sources import check_document, content_hash, read_paths

logger = logging.getLogger(__name__)

FAISS_FILE, DOCSTORE_FILE = layout.FAISS_FILE, layout.DOCSTORE_FILE  # inside a client's index/

Progress = Callable[[int], None]  # called with the number of documents just done (written or unchanged)
Committed = Callable[[list[Document]], None]  # the document versions a batch just committed


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class ClientStore:
    """A client's local retriever. Open with :meth:`open`; one process at a time per client."""

    def __init__(
        self,
        *,
        client_id: str,
        directory: Path,
        cfg: RetrievalConfig,
        embedder,
        docstore: DocStore,
        lock_fd: int,
    ) -> None:
        self.client_id = client_id
        self.directory = directory
        self.cfg = cfg
        self.embedder = embedder
        self.dim = dimension(embedder)
        self._docstore = docstore
        self._lock_fd: int | None = lock_fd
        self._window = window_size(cfg.chunk_tokens, cfg.chunk_overlap, max_tokens(embedder))
        self._index = vindex.load(directory / FAISS_FILE, cfg)
        # True when the in-memory index differs from the file: set by every index change.
        self._dirty = self._index is None
        if self._index is None or self._index.d != self.dim:
            self._index = vindex.build(
                cfg, self.dim, "flat", np.zeros((0, self.dim), np.float32), np.zeros(0)
            )
            self._dirty = True
        self._sync_index()

    @classmethod
    def open(
        cls, data_root: Path | str, client_id: str, retrieval_cfg: RetrievalConfig, embedder
    ) -> ClientStore:
        """Open (creating if needed) ``client_id``'s store; raises InvalidClientId, StoreBusy."""
        directory = layout.client_index_dir(data_root, client_id)  # validates the id first
        _private_dirs(Path(data_root), directory)
        lock_fd = os.open(layout.client_store_lock_file(data_root, client_id), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreBusy(
                f"client {client_id!r}'s store is open in another process (or another ClientStore); "
                "close it and retry"
            ) from None
        docstore = None
        try:
            docstore = DocStore(directory / DOCSTORE_FILE)
            _check_embedder(docstore, embedder)
            return cls(
                client_id=client_id,
                directory=directory,
                cfg=retrieval_cfg,
                embedder=embedder,
                docstore=docstore,
                lock_fd=lock_fd,
            )
        except BaseException:
            if docstore is not None:
                docstore.close()
            os.close(lock_fd)
            raise

    def close(self) -> None:
        if self._lock_fd is None:
            return
        self._docstore.close()
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None

    def __enter__(self) -> ClientStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------------

    def add_documents(
        self,
        docs: Iterable[Document],
        *,
        source: str = "api",
        progress: Progress | None = None,
        guard: AbstractContextManager | None = None,
        on_commit: Committed | None = None,
    ) -> IngestReport:
        """Add documents; identical re-adds are no-ops, a changed document supersedes its old version.

        Every document is checked before anything is written (RetrieverError names the bad one).
        Work is committed in batches of about ``retrieval.ingest_batch_chunks`` chunks.

        ``guard`` (a lock shared with the store's readers) is held only while the store is read
        or written, not while chunks are embedded, so searches go on during a long ingest.
        ``on_commit`` is called with each committed batch's new document versions, inside the guard.
        """
        guard = guard if guard is not None else nullcontext()
        docs = [check_document(doc, self.cfg.max_file_bytes) for doc in docs]
        report = IngestReport()
        batch: list[tuple[Document, str, list[Chunk]]] = []
        batch_hashes: dict[str, str] = {}  # doc id -> hash of its latest version in ``batch``
        batch_chunks = 0
        try:
            for doc in docs:
                digest = content_hash(doc)
                if doc.id in batch_hashes:
                    known = batch_hashes[doc.id]
                else:
                    with guard:
                        current = self._docstore.current(doc.id)
                    known = None if current is None else current["content_hash"]
                if known == digest:
                    report.unchanged += 1
                    if progress is not None:
                        progress(1)
                    continue
                chunks = chunk_text(
                    doc.text, self.embedder.tokenizer, size=self._window[0], overlap=self._window[1]
                )
                batch.append((doc, digest, chunks))
                batch_hashes[doc.id] = digest
                batch_chunks += len(chunks)
                if batch_chunks >= self.cfg.ingest_batch_chunks:
                    self._write_batch(batch, source, report, progress, guard, on_commit)
                    batch, batch_hashes, batch_chunks = [], {}, 0
            if batch:
                self._write_batch(batch, source, report, progress, guard, on_commit)
        finally:
            with guard:
                self._sync_index()
        return report

    def add_paths(self, paths: Iterable[Path | str], *, progress: Progress | None = None) -> IngestReport:
        """Add .txt/.md files (one document each, id = file name) and JSONL files of Documents."""
        files = read_paths(paths, self.cfg.max_file_bytes)  # everything checked before any write
        total = IngestReport()
        for source, docs in files:
            report = self.add_documents(docs, source=source, progress=progress)
            for name in ("added", "unchanged", "superseded", "chunks"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
            total.doc_ids.extend(report.doc_ids)
        return total

    def delete(self, doc_id: str) -> bool:
        """Remove every version of ``doc_id`` from the store and the index; False if unknown."""
        with self._docstore.transaction():
            removed = self._docstore.delete(doc_id)
        if removed is None:
            return False
        self._docstore.checkpoint()  # the deleted text leaves the WAL too (secure_delete zeroes the pages)
        self._index = vindex.remove(self._index, self.cfg, np.asarray(removed, dtype=np.int64))
        self._dirty = True
        self._sync_index()
        return True

    def _write_batch(
        self,
        batch: list[tuple[Document, str, list[Chunk]]],
        source: str,
        report: IngestReport,
        progress: Progress | None,
        guard: AbstractContextManager,
        on_commit: Committed | None,
    ) -> None:
        texts = [chunk.text for _, _, chunks in batch for chunk in chunks]
        vectors = embed(self.embedder, texts, self.cfg.embed_batch_size)  # (N, D), outside the guard
        with guard:
            self._commit_batch(batch, vectors, source, report, on_commit)
        if progress is not None:
            progress(len(batch))

    def _commit_batch(
        self,
        batch: list[tuple[Document, str, list[Chunk]]],
        vectors: np.ndarray,
        source: str,
        report: IngestReport,
        on_commit: Committed | None,
    ) -> None:
        removed: list[int] = []
        added: list[int] = []
        used: list[int] = []  # the row of ``vectors`` of each added chunk
        written: list[Document] = []
        now = _now()
        row = 0
        with self._docstore.transaction():
            for doc, digest, chunks in batch:
                current = self._docstore.current(doc.id)
                if current is not None and current["content_hash"] == digest:
                    # Another writer stored this very version while our chunks were embedded.
                    report.unchanged += 1
                    row += len(chunks)
                    continue
                if current is not None:
                    removed.extend(self._docstore.supersede(doc.id, now))
                    report.superseded += 1
                else:
                    report.added += 1
                version = self._docstore.next_version(doc.id)
                self._docstore.insert_document(
                    doc_id=doc.id,
                    version=version,
                    content_hash=digest,
                    text=doc.text,
                    metadata=doc.metadata,
                    source=source,
                    now=now,
                )
                for chunk in chunks:
                    added.append(
                        self._docstore.insert_chunk(
                            doc_id=doc.id,
                            version=version,
                            position=chunk.position,
                            start=chunk.start,
                            end=chunk.end,
                            text=chunk.text,
                            vector=vectors[row],
                        )
                    )
                    used.append(row)
                    row += 1
                report.doc_ids.append(doc.id)
                written.append(doc)
        # Committed. A chunk added and superseded within this batch never reaches the index.
        gone = set(removed)
        keep = np.array([chunk_id not in gone for chunk_id in added], dtype=bool)
        stale = np.array(sorted(gone.difference(added)), dtype=np.int64)
        self._index = vindex.remove(self._index, self.cfg, stale)
        self._dirty = True
        if keep.any():
            self._index.add_with_ids(vectors[np.asarray(used)[keep]], np.asarray(added, dtype=np.int64)[keep])
        report.chunks += int(keep.sum())
        if on_commit is not None and written:
            on_commit(written)

    def _sync_index(self) -> None:
        """Make the index hold exactly the docstore's live chunks, in the right structure; save it."""
        live, held = self._docstore.live_ids(), vindex.ids_of(self._index)
        extra = np.setdiff1d(held, live)
        missing = np.setdiff1d(live, held)
        if len(extra):
            logger.warning(
                "client %s: dropping %d index ids the docstore no longer holds", self.client_id, len(extra)
            )
            self._index = vindex.remove(self._index, self.cfg, extra)
            self._dirty = True
        if len(missing):
            logger.info(
                "client %s: indexing %d committed chunks missing from the index", self.client_id, len(missing)
            )
            self._index.add_with_ids(self._docstore.live_vectors(missing, self.dim), missing)
            self._dirty = True
        fitted = vindex.fit(self._index, self.cfg)
        if fitted is not self._index:
            self._index, self._dirty = fitted, True
        if self._dirty:
            vindex.save(self._index, self.directory / FAISS_FILE)
            self._dirty = False

    # -- reads --------------------------------------------------------------------------------

    def search(self, query: str, k: int | None = None, where: dict[str, Any] | None = None) -> list[Hit]:
        """The ``k`` chunks closest to ``query`` (cosine), best first, optionally metadata-filtered."""
        return self.search_many([query], k, where)[0]

    def search_many(
        self, queries: Sequence[str], k: int | None = None, where: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """``search`` for many queries, embedded and searched as one batch."""
        queries = list(queries)
        for query in queries:
            if not isinstance(query, str) or not query.strip():
                raise RetrieverError("empty search query; give some text to search for")
        if not queries:
            return []
        return self.search_vectors(embed(self.embedder, queries, self.cfg.embed_batch_size), k, where)

    def search_vectors(
        self, vectors: np.ndarray, k: int | None = None, where: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Search with query vectors already embedded (unit norm), shape (Q, D)."""
        k = self.cfg.top_k if k is None else k
        if not isinstance(k, int) or k < 1:
            raise RetrieverError(f"k must be a positive integer, got {k!r}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        allowed = None
        if where:
            try:
                allowed = self._docstore.filter_ids(where)
            except ValueError as exc:
                raise RetrieverError(str(exc)) from None
        if self._index.ntotal == 0 or (allowed is not None and len(allowed) == 0):
            return [[] for _ in range(len(vectors))]
        scores, ids = vindex.search(self._index, vectors, min(k, self._index.ntotal), allowed)
        rows = self._docstore.chunks_by_id(sorted({int(i) for i in ids.ravel() if i >= 0}))
        results = []
        for query_scores, query_ids in zip(scores, ids, strict=True):
            hits = []
            for score, chunk_id in zip(query_scores, query_ids, strict=True):
                row = rows.get(int(chunk_id))
                if row is None:
                    continue
                hits.append(
                    Hit(
                        chunk_id=int(chunk_id),
                        doc_id=row["doc_id"],
                        text=row["text"],
                        score=float(score),
                        metadata=json.loads(row["metadata"]),
                        version=row["version"],
                        position=row["position"],
                    )
                )
            results.append(hits)
        return results

    def get_document(self, doc_id: str, version: int | None = None) -> StoredDocument | None:
        """The current version of ``doc_id`` (or a given one) with its chunk texts; None if absent."""
        row = self._docstore.document(doc_id, version)
        return None if row is None else self._stored(row, with_chunks=True)

    def list_documents(self) -> list[StoredDocument]:
        """The current version of every document, by id (chunk texts left out)."""
        return [self._stored(row, with_chunks=False) for row in self._docstore.current_documents()]

    def texts(self) -> Iterator[tuple[str, str]]:
        """(doc_id, text) of every current document, one at a time (for scans over all of them)."""
        return self._docstore.current_texts()

    def history(self, doc_id: str) -> list[StoredDocument]:
        """Every stored version of ``doc_id``, oldest first, with when each was added and superseded."""
        return [self._stored(row, with_chunks=True) for row in self._docstore.versions(doc_id)]

    def stats(self) -> dict[str, Any]:
        counts = self._docstore.counts()
        files = [self.directory / FAISS_FILE, *self.directory.glob(DOCSTORE_FILE + "*")]
        return {
            "client_id": self.client_id,
            **counts,
            "indexed": int(self._index.ntotal),
            "index": vindex.kind_of(self._index),
            "dim": self.dim,
            "chunk_tokens": self._window[0],
            "chunk_overlap": self._window[1],
            "disk_bytes": sum(p.stat().st_size for p in files if p.exists()),
            "path": str(self.directory),
        }

    def _stored(self, row, *, with_chunks: bool) -> StoredDocument:
        chunks = self._docstore.chunk_texts(row["doc_id"], row["version"]) if with_chunks else []
        return StoredDocument.from_row(row, chunks)


def _private_dirs(root: Path, directory: Path) -> None:
    """Create ``directory`` and the missing ones above it (up to ``root``) owner-only (0700)."""
    missing = []
    path = directory
    while not path.exists():
        missing.append(path)
        if path == root or path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask
    for path in (directory, directory.parent):
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)


def _check_embedder(docstore: DocStore, embedder) -> None:
    """Refuse a store built with another embedder; record the embedder on first use."""
    probe = embed(embedder, [FINGERPRINT_TEXT], 1)[0]
    stored = docstore.get_meta("embedder_fingerprint")
    if stored is None:
        with docstore.transaction():
            docstore.set_meta("embedder_fingerprint", json.dumps(probe.tolist()))
        return
    reference = np.asarray(json.loads(stored), dtype=np.float32)
    if reference.shape != probe.shape or float(reference @ probe) < FINGERPRINT_MIN_COSINE:
        raise EmbedderMismatch(
            f"{docstore.path.parent} was indexed with a different embedder (dimension {reference.shape[0]}); "
            "use the same models.embedder, or delete the index and ingest again"
        )
