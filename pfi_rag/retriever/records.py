"""What the retriever hands back: search hits, ingest reports, stored documents, and its errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk; ``score`` is the cosine similarity to the query (higher is closer)."""

    chunk_id: int
    doc_id: str
    text: str
    score: float
    metadata: dict[str, Any]
    version: int
    position: int = 0


@dataclass
class IngestReport:
    added: int = 0  # documents new to the store
    unchanged: int = 0  # identical to the current version (content hash): nothing written
    superseded: int = 0  # new versions of known documents; the old chunks left the index
    chunks: int = 0  # chunks embedded and indexed
    doc_ids: list[str] = field(default_factory=list, repr=False)  # documents written (added or superseded)

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "unchanged": self.unchanged,
            "superseded": self.superseded,
            "chunks": self.chunks,
        }


@dataclass(frozen=True)
class StoredDocument:
    """One version of a document as the store holds it."""

    doc_id: str
    version: int
    text: str
    metadata: dict[str, Any]
    source: str
    content_hash: str
    added_at: str  # ISO 8601, UTC
    superseded_at: str | None  # None for the current version
    chunks: list[str] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], chunks: list[str]) -> StoredDocument:
        """A docstore ``documents`` row (metadata as JSON text) with the chunk texts wanted."""
        return cls(
            doc_id=row["doc_id"],
            version=row["version"],
            text=row["text"],
            metadata=json.loads(row["metadata"]),
            source=row["source"],
            content_hash=row["content_hash"],
            added_at=row["added_at"],
            superseded_at=row["superseded_at"],
            chunks=chunks,
        )


class RetrieverError(ValueError):
    """Bad input to a client's store; the message says what to fix and nothing was written."""


class StoreBusy(RuntimeError):
    """Another process holds this client's store open for writing."""


class EmbedderMismatch(RetrieverError):
    """The store was built with a different embedder; its vectors are not comparable."""
