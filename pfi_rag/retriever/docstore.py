"""The SQLite side of a client's store: documents, their versions, chunks and vectors.

The docstore is the source of truth; the FAISS index is a derived, rebuildable view of its
live chunks. Each ingest batch is one SQLite transaction (WAL mode, fsync on commit), so a
killed process leaves either all or none of a batch, and the index is reconciled against
the live chunk ids on the next open. Chunk vectors are kept (as float32 blobs) while a chunk
is live, which is what makes that reconciliation possible without re-embedding.

Versions: a document id has one row per version; the current one has ``superseded_at`` NULL.
Superseded versions keep their text and chunk texts (staleness probes read them) but lose
their vectors. ``delete`` removes every version of a document: a deletion is a deletion.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    source TEXT NOT NULL,
    added_at TEXT NOT NULL,
    superseded_at TEXT,
    PRIMARY KEY (doc_id, version)
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: stale index ids cannot collide
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER NOT NULL,
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    text TEXT NOT NULL,
    live INTEGER NOT NULL,
    embedding BLOB,
    FOREIGN KEY (doc_id, version) REFERENCES documents (doc_id, version) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (doc_id, version);
CREATE INDEX IF NOT EXISTS chunks_live ON chunks (live);
"""

_META_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class DocStore:
    """One client's SQLite database; single writer (the store holds the client's lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # Owner-only: the file holds every document in plain text. SQLite creates its -wal and
        # -shm files with the main file's mode, so they follow; older stores are tightened here.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            if name.exists():
                name.chmod(0o600)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in ``transaction``).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        # Deleted rows are overwritten with zeros, not just unlinked: a deletion is a deletion.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced before it returns, so "completed" survives power loss too.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if self.get_meta("schema_version") is None:
                self.set_meta("schema_version", SCHEMA_VERSION)

    def close(self) -> None:
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the main file and empty it (no deleted text stays in the WAL)."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- writes (call inside ``transaction``) ---------------------------------------------------

    def current(self, doc_id: str) -> sqlite3.Row | None:
        return self._db.execute(
            "SELECT * FROM documents WHERE doc_id = ? AND superseded_at IS NULL", (doc_id,)
        ).fetchone()

    def supersede(self, doc_id: str, now: str) -> list[int]:
        """Retire the current version of ``doc_id``; returns the chunk ids that left the index."""
        ids = [
            row[0]
            for row in self._db.execute(
                "SELECT chunk_id FROM chunks WHERE doc_id = ? AND live = 1", (doc_id,)
            )
        ]
        self._db.execute(
            "UPDATE chunks SET live = 0, embedding = NULL WHERE doc_id = ? AND live = 1", (doc_id,)
        )
        self._db.execute(
            "UPDATE documents SET superseded_at = ? WHERE doc_id = ? AND superseded_at IS NULL", (now, doc_id)
        )
        return ids

    def next_version(self, doc_id: str) -> int:
        row = self._db.execute("SELECT MAX(version) FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return (row[0] or 0) + 1

    def insert_document(
        self,
        *,
        doc_id: str,
        version: int,
        content_hash: str,
        text: str,
        metadata: dict[str, Any],
        source: str,
        now: str,
    ) -> None:
        self._db.execute(
            "INSERT INTO documents (doc_id, version, content_hash, text, metadata, source, added_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (doc_id, version, content_hash, text, json.dumps(metadata, sort_keys=True), source, now),
        )

    def insert_chunk(
        self, *, doc_id: str, version: int, position: int, start: int, end: int, text: str, vector: np.ndarray
    ) -> int:
        cursor = self._db.execute(
            "INSERT INTO chunks (doc_id, version, position, start_char, end_char, text, live, embedding)"
            " VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            (doc_id, version, position, start, end, text, np.asarray(vector, dtype=np.float32).tobytes()),
        )
        return int(cursor.lastrowid)

    def delete(self, doc_id: str) -> list[int] | None:
        """Remove every version of ``doc_id``; the live chunk ids it had, or None if unknown."""
        if self._db.execute("SELECT 1 FROM documents WHERE doc_id = ? LIMIT 1", (doc_id,)).fetchone() is None:
            return None
        ids = [
            row[0]
            for row in self._db.execute(
                "SELECT chunk_id FROM chunks WHERE doc_id = ? AND live = 1", (doc_id,)
            )
        ]
        self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self._db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return ids

    # -- reads --------------------------------------------------------------------------------

    def live_ids(self) -> np.ndarray:
        rows = self._db.execute("SELECT chunk_id FROM chunks WHERE live = 1").fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def live_vectors(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """The stored vectors of ``ids`` (all live), in that order: shape (len(ids), dim)."""
        out = np.empty((len(ids), dim), dtype=np.float32)
        order = {int(chunk_id): row for row, chunk_id in enumerate(ids)}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            batch = [int(i) for i in ids[start : start + 900]]
            marks = ",".join("?" * len(batch))
            for chunk_id, blob in self._db.execute(
                f"SELECT chunk_id, embedding FROM chunks WHERE chunk_id IN ({marks})", batch
            ):
                out[order[chunk_id]] = np.frombuffer(blob, dtype=np.float32)
        return out

    def chunks_by_id(self, ids: list[int]) -> dict[int, sqlite3.Row]:
        """Chunk text with its document's version and metadata, for the hits of a search."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            "SELECT c.chunk_id, c.doc_id, c.version, c.position, c.text, d.metadata"
            " FROM chunks c JOIN documents d ON d.doc_id = c.doc_id AND d.version = c.version"
            f" WHERE c.chunk_id IN ({marks})",
            ids,
        )
        return {row["chunk_id"]: row for row in rows}

    def filter_ids(self, where: dict[str, Any]) -> np.ndarray:
        """Live chunk ids whose document metadata matches every ``key: value`` (a list = any of)."""
        clauses, params = [], []
        for key, value in where.items():
            if not isinstance(key, str) or not _META_KEY.fullmatch(key):
                raise ValueError(f"metadata filter key {key!r}: use letters, digits, '_', '.' or '-'")
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str | int | float | bool) for v in values):
                raise ValueError(f"metadata filter {key!r}: give a string, number, boolean or a list of them")
            marks = ",".join("?" * len(values))
            clauses.append(f"json_extract(d.metadata, ?) IN ({marks})")
            params.append(f'$."{key}"')
            params.extend(int(v) if isinstance(v, bool) else v for v in values)
        sql = (
            "SELECT c.chunk_id FROM chunks c"
            " JOIN documents d ON d.doc_id = c.doc_id AND d.version = c.version"
            " WHERE c.live = 1" + "".join(f" AND {clause}" for clause in clauses)
        )
        rows = self._db.execute(sql, params).fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def document(self, doc_id: str, version: int | None = None) -> sqlite3.Row | None:
        if version is None:
            return self.current(doc_id)
        return self._db.execute(
            "SELECT * FROM documents WHERE doc_id = ? AND version = ?", (doc_id, version)
        ).fetchone()

    def versions(self, doc_id: str) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT * FROM documents WHERE doc_id = ? ORDER BY version", (doc_id,)
        ).fetchall()

    def current_documents(self) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT d.*, (SELECT COUNT(*) FROM chunks c WHERE c.doc_id = d.doc_id AND c.version = d.version)"
            " AS n_chunks FROM documents d WHERE d.superseded_at IS NULL ORDER BY d.doc_id"
        ).fetchall()

    def current_texts(self) -> Iterator[tuple[str, str]]:
        """(doc_id, text) of every current document, one row in memory at a time."""
        rows = self._db.execute("SELECT doc_id, text FROM documents WHERE superseded_at IS NULL")
        for row in rows:
            yield row[0], row[1]

    def chunk_texts(self, doc_id: str, version: int) -> list[str]:
        rows = self._db.execute(
            "SELECT text FROM chunks WHERE doc_id = ? AND version = ? ORDER BY position", (doc_id, version)
        )
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        one = self._db.execute(
            "SELECT"
            " (SELECT COUNT(*) FROM documents WHERE superseded_at IS NULL) AS documents,"
            " (SELECT COUNT(*) FROM documents WHERE superseded_at IS NOT NULL) AS superseded_versions,"
            " (SELECT COUNT(*) FROM chunks WHERE live = 1) AS chunks"
        ).fetchone()
        return dict(one)


def _read_only_rows(path: Path, query: str) -> list[tuple]:
    """``query``'s rows through a read-only connection that takes no lock (sees the last commit)."""
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def read_current_documents(path: Path) -> list[dict[str, Any]]:
    """``(doc_id, version, text, metadata, source)`` of every current document, by id, read
    through a read-only connection that takes no lock: training and probes read a client's
    documents while its store is open for writing elsewhere (the server, an ingest), and see
    the last committed state (WAL). Deleted documents are gone, superseded versions skipped."""
    rows = _read_only_rows(
        path,
        "SELECT doc_id, version, text, metadata, source FROM documents"
        " WHERE superseded_at IS NULL ORDER BY doc_id",
    )
    return [
        {"doc_id": d, "version": v, "text": t, "metadata": json.loads(m), "source": s}
        for d, v, t, m, s in rows
    ]


def read_superseded_versions(path: Path) -> list[dict[str, Any]]:
    """Every version of each document that has a superseded one, ``{doc_id, version, text, current}``,
    oldest first, through a read-only connection (as :func:`read_current_documents`): what the
    stale-retrieval probe checks the index against. Deleted documents have no versions left."""
    rows = _read_only_rows(
        path,
        "SELECT doc_id, version, text, superseded_at IS NULL FROM documents WHERE doc_id IN"
        " (SELECT doc_id FROM documents WHERE superseded_at IS NOT NULL) ORDER BY doc_id, version",
    )
    return [{"doc_id": d, "version": v, "text": t, "current": bool(c)} for d, v, t, c in rows]
