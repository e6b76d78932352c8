"""Reading documents from what a user hands over: text, .txt/.md files, JSONL of Documents.

Everything is validated before the store writes anything, so a bad file in a batch of paths
changes nothing; each error names the file (and line) and what to fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from pfi_rag.data.records import Document
from pfi_rag.retriever.records import RetrieverError

TEXT_SUFFIXES = {".txt", ".md"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl"}
MAX_DOC_ID_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def content_hash(doc: Document) -> str:
    """Identity of a version: same text and metadata = same hash = nothing to re-index."""
    canonical = json.dumps({"text": doc.text, "metadata": doc.metadata}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def text_document(text: str, doc_id: str | None = None, metadata: dict | None = None) -> Document:
    """A document from plain text; without an id, the id is derived from the text."""
    if doc_id is None:
        doc_id = "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Document(id=doc_id, text=text, metadata=metadata or {})


def check_document(doc: Document, max_bytes: int, where: str = "") -> Document:
    prefix = f"{where}: " if where else ""
    if not isinstance(doc, Document):
        raise RetrieverError(f"{prefix}expected a pfi_rag.data.records.Document, got {type(doc).__name__}")
    if not doc.id or len(doc.id) > MAX_DOC_ID_CHARS or _CONTROL.search(doc.id):
        raise RetrieverError(
            f"{prefix}document id {doc.id[:80]!r}: use 1-{MAX_DOC_ID_CHARS} characters, no control characters"
        )
    if not doc.text.strip():
        raise RetrieverError(f"{prefix}document {doc.id!r} is empty; give it some text or leave it out")
    size = len(doc.text.encode("utf-8"))
    if size > max_bytes:
        raise RetrieverError(
            f"{prefix}document {doc.id!r} is {size} bytes, over retrieval.max_file_bytes={max_bytes}; "
            "split it or raise the limit"
        )
    return doc


def expand(paths: Iterable[Path | str]) -> list[tuple[Path, str]]:
    """(file, id prefix) for each path; a directory contributes its supported files, sorted."""
    files: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise RetrieverError(f"{path}: no {', '.join(sorted(SUFFIXES))} files in this directory")
            files.extend((p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise RetrieverError(f"{path}: unsupported file type; give .txt, .md or .jsonl files")
            files.append((path, path.name))
        else:
            raise RetrieverError(f"{path}: no such file or directory")
    return files


def read_file(path: Path, doc_id: str, max_bytes: int) -> list[Document]:
    """The documents in one file: one per .txt/.md file, one per JSONL line."""
    size = path.stat().st_size
    if size > max_bytes:
        raise RetrieverError(
            f"{path}: {size} bytes is over retrieval.max_file_bytes={max_bytes}; "
            "split the file or raise the limit"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RetrieverError(
            f"{path}: not UTF-8 (invalid byte at offset {exc.start}); convert it, e.g. with iconv"
        ) from None
    if path.suffix.lower() in TEXT_SUFFIXES:
        doc = Document(id=doc_id, text=text, metadata={"file": path.name, "format": path.suffix.lower()[1:]})
        return [check_document(doc, max_bytes, str(path))]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = Document.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "line"
            raise RetrieverError(
                f"{path}:{number}: not a document ({field}: {first['msg']}); "
                'each line must be {"id": ..., "text": ..., "metadata": {...}}'
            ) from None
        docs.append(check_document(doc, max_bytes, f"{path}:{number}"))
    if not docs:
        raise RetrieverError(f"{path}: no documents in this file")
    return docs


def read_paths(paths: Iterable[Path | str], max_bytes: int) -> list[tuple[str, list[Document]]]:
    """(source, documents) per file, all read and checked before anything is written."""
    return [(str(path), read_file(path, doc_id, max_bytes)) for path, doc_id in expand(paths)]
