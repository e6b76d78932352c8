"""A client's own documents as its training and evaluation data: its store, split deterministically.

The data of record is the client's store (``clients/<id>/index/docstore.sqlite``), whatever
wrote it: ``pfi-rag ingest``, the HTTP API or ``pfi-rag data synth``. Only current versions
count; a deleted document is gone from the next training. A data root written by
:func:`pfi_rag.data.synth.synthesize` alone (no store yet: tests, the benchmark before it
ingests) falls back to its ``data/documents.jsonl``; once a client has a store, the store is
the only source. Instruction pairs (``data/instructions.jsonl``) are an optional extra.

The held-out split: a document is held out when ``sha256(salt, id)`` falls below the client's
share (``data.held_out_share``), so the split is deterministic, keeps a document on its side
across versions, and cannot be guessed without the salt. Salt and share are written once to
``clients/<id>/split.json`` and never leave the client; held-out documents are never trained
on (they stay retrievable: the split is about training only). A document's metadata can pin
it: ``{"split": "train"}`` or ``{"split": "held_out"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pfi_rag import layout
from pfi_rag.data.records import Document, Instruction, read_jsonl

logger = logging.getLogger(__name__)

SPLIT_KEY = "split"  # document metadata pinning a side: "train" or "held_out"
PINS = ("train", "held_out")
DEFAULT_HELD_OUT_SHARE = 0.2  # config.DataConfig.held_out_share's default


class CorpusError(ValueError):
    """A client's data cannot be used as asked; the message says what to change."""


@dataclass(frozen=True)
class ClientCorpus:
    """One client's documents on each side of its split (current versions, sorted by id)."""

    client_id: str
    train: list[Document]
    held_out: list[Document]
    instructions: list[Instruction] = field(default_factory=list)  # optional, always trained on
    held_out_share: float = DEFAULT_HELD_OUT_SHARE
    source: str = "store"  # "store", or the synthetic documents.jsonl a store-less root falls back to

    @property
    def records(self) -> int:
        """Training records (the DP unit): one per training document and per instruction."""
        return len(self.train) + len(self.instructions)


def current_documents(data_root: Path, client_id: str) -> tuple[list[Document], str]:
    """Every current document of the client, by id, and where they came from."""
    path = layout.client_docstore_file(data_root, client_id)
    if path.is_file():
        from pfi_rag.retriever.docstore import read_current_documents

        rows = read_current_documents(path)
        return [Document(id=r["doc_id"], text=r["text"], metadata=r["metadata"]) for r in rows], "store"
    legacy = layout.client_data_dir(data_root, client_id) / "documents.jsonl"
    if legacy.is_file():
        return sorted(read_jsonl(legacy, Document), key=lambda d: d.id), str(legacy)
    return [], "store"


def _split_record(data_root: Path, client_id: str, held_out_share: float) -> dict:
    """The client's salt and share, created on first use (a no-replace link: two processes that
    race both end up with the one file that won)."""
    path = layout.client_split_file(data_root, client_id)
    if not path.is_file():
        record = {"salt": secrets.token_hex(16), "held_out_share": held_out_share, "format": 1}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        salt, share = str(record["salt"]), float(record["held_out_share"])
    except (ValueError, KeyError, TypeError):
        raise CorpusError(
            f"{path} is damaged; remove it to draw a new split (documents already trained on may "
            "then be held out, so membership probes would be biased until the next fresh client)"
        ) from None
    if not 0 <= share < 1:
        raise CorpusError(f"{path}: held_out_share {share} is not in [0, 1); remove the file to re-split")
    return {"salt": salt, "held_out_share": share}


def is_held_out(doc: Document, salt: str, share: float) -> bool:
    pin = doc.metadata.get(SPLIT_KEY)
    if pin in PINS:
        return pin == "held_out"
    digest = hashlib.sha256(f"{salt}\x00{doc.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def load_corpus(data_root: Path, client_id: str, *, held_out_share: float | None = None) -> ClientCorpus:
    """``client_id``'s current documents split into train and held-out, plus its instructions.

    ``held_out_share`` applies to a client's first split only (None: ``data.held_out_share``'s
    default); after that the share recorded in ``clients/<id>/split.json`` wins, with a warning
    when it differs. Raises :class:`CorpusError` for a client with nothing under the data root.
    """
    root = Path(data_root)
    directory = layout.client_dir(root, client_id)  # validates the id
    if not directory.is_dir():
        raise CorpusError(
            f"client {client_id!r} has no training data: there is no such client in {root}; add its "
            f"documents with `pfi-rag ingest --client {client_id} DIR/`"
        )
    wanted = DEFAULT_HELD_OUT_SHARE if held_out_share is None else float(held_out_share)
    if not 0 <= wanted < 1:
        raise CorpusError(f"held-out share {wanted} is not in [0, 1); set data.held_out_share to e.g. 0.2")
    record = _split_record(root, client_id, wanted)
    share = record["held_out_share"]
    if held_out_share is not None and abs(share - wanted) > 1e-12:
        logger.warning(
            "client %s: its split was fixed at held-out share %g (%s); %g is ignored. Remove that "
            "file to re-split (documents already trained on could then be held out)",
            client_id,
            share,
            layout.client_split_file(root, client_id),
            wanted,
        )
    documents, source = current_documents(root, client_id)
    train, held_out = [], []
    for doc in documents:
        (held_out if is_held_out(doc, record["salt"], share) else train).append(doc)
    instructions_path = layout.client_data_dir(root, client_id) / "instructions.jsonl"
    instructions = read_jsonl(instructions_path, Instruction) if instructions_path.is_file() else []
    return ClientCorpus(
        client_id=client_id,
        train=train,
        held_out=held_out,
        instructions=instructions,
        held_out_share=share,
        source=source,
    )


def too_little_data(corpus: ClientCorpus, batch_size: int) -> str | None:
    """Why this client's training data is too small for its privacy settings, or None.

    DP-SGD samples each record with rate q = 1/ceil(n/batch_size); with fewer records than one
    expected batch, q = 1: every step takes every record, sampling amplifies nothing, and the
    noise that buys the round's epsilon is as large as the whole batch's signal.
    """
    n = corpus.records
    if n >= batch_size:
        return None
    cid = corpus.client_id
    return (
        f"client {cid!r} has {n} training records ({len(corpus.train)} documents, "
        f"{len(corpus.held_out)} more held out, {len(corpus.instructions)} instructions), fewer than "
        f"privacy.batch_size = {batch_size}: DP noise will drown what it learns. Add documents "
        f"(`pfi-rag ingest --client {cid} DIR/`), lower privacy.batch_size, or lower data.held_out_share "
        "before its first split"
    )


def require_training_data(corpus: ClientCorpus) -> None:
    """Raise :class:`CorpusError` (what to do) when the client has no record to train on."""
    if corpus.records:
        return
    cid = corpus.client_id
    if corpus.held_out:
        raise CorpusError(
            f"client {cid!r} has {len(corpus.held_out)} documents, all held out for evaluation: add more "
            f"with `pfi-rag ingest --client {cid} DIR/`"
        )
    raise CorpusError(
        f"client {cid!r} has no documents to train on: add them with `pfi-rag ingest --client {cid} DIR/` "
        "(or the HTTP API)"
    )


def warn_locally(data_root: Path, client_id: str, text: str) -> None:
    """Tell the client (its process log and its own log file under ``clients/<id>/``), never the
    server: what a warning about a client's data says is about its data."""
    import datetime as dt

    logger.warning("client %s: %s", client_id, text)
    path = layout.client_log_file(data_root, client_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} warning: {text}\n")
