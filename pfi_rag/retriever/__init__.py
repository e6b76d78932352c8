"""Each client's local retriever: chunking, embedding, a FAISS index and a document store on disk.

``ClientStore.open(data_root, client_id, cfg.retrieval, embedder)`` is the entry point; see
:mod:`pfi_rag.retriever.store` for the on-disk layout and its crash-safety argument.
"""

from pfi_rag.retriever.records import (
    EmbedderMismatch,
    Hit,
    IngestReport,
    RetrieverError,
    StoreBusy,
    StoredDocument,
)


def __getattr__(name: str):
    # Imported on first use: the records and the read-only queries are cheap, the store pulls in
    # FAISS and the embedder's stack (seconds), which `pfi-rag docs list` does not need.
    if name == "ClientStore":
        from pfi_rag.retriever.store import ClientStore

        return ClientStore
    raise AttributeError(f"module 'pfi_rag.retriever' has no attribute {name!r}")


__all__ = [
    "ClientStore",
    "EmbedderMismatch",
    "Hit",
    "IngestReport",
    "RetrieverError",
    "StoreBusy",
    "StoredDocument",
]
