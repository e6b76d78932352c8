"""The server's client stores: opened on first use, kept open (one per client), closed at shutdown.

A :class:`~pfi_rag.retriever.ClientStore` holds a per-client file lock, so this process owns the
stores it opened until it stops. Requests from the thread pool share a store through a
per-client lock (SQLite and the FAISS index are not written from two threads at once).

What holds the client's lock, and for how long: a search, for its index scan (the query is
embedded before); a write, for its reads of the docstore and each batch's commit (chunks are
embedded and the new documents scanned for the probes before, outside it). The probes' copy
index and PII state are updated inside the commit, for the written documents only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pfi_rag import layout
from pfi_rag.api.textindex import DocumentText, TextIndex
from pfi_rag.config import RetrievalConfig
from pfi_rag.data.records import Document
from pfi_rag.retriever import ClientStore, Hit, IngestReport, RetrieverError, StoreBusy
from pfi_rag.retriever.embedding import embed

logger = logging.getLogger(__name__)


class StoreRegistry:
    def __init__(self, data_root: Path, cfg: RetrievalConfig, embedder, texts: TextIndex):
        self.data_root = Path(data_root)
        self.cfg = cfg
        self.embedder = embedder
        self.texts = texts
        self._stores: dict[str, tuple[ClientStore, threading.Lock]] = {}
        self._lock = threading.Lock()  # guards _stores; opening happens under it (rare, ~10 ms)

    def _entry(self, client_id: str) -> tuple[ClientStore, threading.Lock]:
        entry = self._stores.get(client_id)  # the common case, without the registry's lock
        if entry is not None:
            return entry
        with self._lock:
            entry = self._stores.get(client_id)
            if entry is not None:
                return entry
            store = ClientStore.open(self.data_root, client_id, self.cfg, self.embedder)
            lock = threading.Lock()
            lock.acquire()  # the scan below runs under the client's lock, not the registry's
            self._stores[client_id] = entry = (store, lock)
        try:
            # One linear pass over the client's texts, one document in memory at a time.
            scanned = [(doc_id, self.texts.scan(text)) for doc_id, text in store.texts()]
            self.texts.apply(client_id, scanned)
        finally:
            lock.release()
        return entry

    @contextmanager
    def use(self, client_id: str) -> Iterator[ClientStore]:
        """The client's store, held by this thread (for reads; writes go through the methods below)."""
        store, lock = self._entry(client_id)
        with lock:
            yield store

    def add_documents(self, client_id: str, docs: Sequence[Document], source: str) -> IngestReport:
        """``ClientStore.add_documents`` holding the client's lock only to read and to commit."""
        store, lock = self._entry(client_id)
        scans: dict[int, DocumentText] = {id(doc): self.texts.scan(doc.text) for doc in docs}

        def committed(written: list[Document]) -> None:
            self.texts.apply(client_id, [(doc.id, scans[id(doc)]) for doc in written])

        return store.add_documents(docs, source=source, guard=lock, on_commit=committed)

    def delete(self, client_id: str, doc_id: str) -> bool:
        """Remove every version of a document; the probes forget its text at once."""
        with self.use(client_id) as store:
            deleted = store.delete(doc_id)
            if deleted:
                self.texts.apply(client_id, [(doc_id, None)])
        return deleted

    def search(self, client_id: str, query: str, k: int, where: dict | None = None) -> list[Hit]:
        """``ClientStore.search``, with the query embedded before taking the client's lock.

        Embedding is most of a search's time; done outside the lock, concurrent requests of one
        client embed in parallel and hold the lock only for the index scan.
        """
        if not query.strip():
            raise RetrieverError("empty search query; give some text to search for")
        vectors = embed(self.embedder, [query], self.cfg.embed_batch_size)
        with self.use(client_id) as store:
            return store.search_vectors(vectors, k, where)[0]

    def has_index(self, client_id: str) -> bool:
        return client_id in self._stores or layout.client_index_dir(self.data_root, client_id).is_dir()

    def preload(self) -> int:
        """Open every client's existing store; a store busy in another process is skipped (logged)."""
        opened = 0
        for client_id in layout.list_clients(self.data_root):
            if not layout.client_index_dir(self.data_root, client_id).is_dir():
                continue
            try:
                self._entry(client_id)
                opened += 1
            except StoreBusy:
                logger.warning(
                    "client %s's store is open in another process; opening it on first use", client_id
                )
        return opened

    def close(self) -> None:
        with self._lock:
            for store, lock in self._stores.values():
                with lock:
                    store.close()
            self._stores.clear()
