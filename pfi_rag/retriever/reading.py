"""Read a client's documents without opening its store: no lock, no FAISS, no embedder.

A read-only SQLite connection sees the last committed state (WAL), so `pfi-rag docs list` and
`docs show` answer at once, even while a server or an ingest holds the client's store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from pfi_rag import layout
from pfi_rag.retriever.records import StoredDocument


def current_documents(data_root: Path, client_id: str) -> list[StoredDocument]:
    """The current version of every document of ``client_id``, by id (chunk texts left out)."""
    with _connect(data_root, client_id) as db:
        if db is None:
            return []
        rows = db.execute(
            "SELECT * FROM documents WHERE superseded_at IS NULL ORDER BY doc_id"
        ).fetchall()
        return [_stored(db, row, with_chunks=False) for row in rows]


def document_versions(data_root: Path, client_id: str, doc_id: str) -> list[StoredDocument]:
    """Every stored version of ``doc_id``, oldest first, with its chunk texts; [] if absent."""
    with _connect(data_root, client_id) as db:
        if db is None:
            return []
        rows = db.execute("SELECT * FROM documents WHERE doc_id = ? ORDER BY version", (doc_id,)).fetchall()
        return [_stored(db, row, with_chunks=True) for row in rows]


@contextmanager
def _connect(data_root: Path, client_id: str) -> Iterator[sqlite3.Connection | None]:
    path = layout.client_docstore_file(data_root, client_id)  # validates the id
    if not path.is_file():
        yield None
        return
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        yield db


def _stored(db: sqlite3.Connection, row: sqlite3.Row, *, with_chunks: bool) -> StoredDocument:
    chunks = []
    if with_chunks:
        chunks = [
            r[0]
            for r in db.execute(
                "SELECT text FROM chunks WHERE doc_id = ? AND version = ? ORDER BY position",
                (row["doc_id"], row["version"]),
            )
        ]
    return StoredDocument.from_row(row, chunks)
