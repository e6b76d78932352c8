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
from pfi_rag.retriever.store import ClientStore

__all__ = [
    "ClientStore",
    "EmbedderMismatch",
    "Hit",
    "IngestReport",
    "RetrieverError",
    "StoreBusy",
    "StoredDocument",
]
