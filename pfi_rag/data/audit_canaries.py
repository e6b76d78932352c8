"""A client's audit canaries: random secrets that measure what its DP training lets through.

With ``privacy.audit_canaries = N`` (opt-in per deployment), a client generates N canaries once,
from OS entropy: a random prefix ("Audit note qzkfmwra: the access code is") and a random
``privacy.audit_canary_digits``-digit secret. Each is inserted into the client's training with
probability 1/2, independently; the rest are controls. The inserted ones join the DP training
stream only, as extra records: they are never ingested into the store (so never retrieved,
never quoted in an answer) and never held out. The one-run audit (probes/audit.py) and the
exposure probe compare the two halves.

Everything stays in ``clients/<id>/audit/canaries.json`` on the client, with a log of each
training call that inserted them (the ledger records the privacy spend; this file records that
the spend's records included canaries). Nothing here is ever released.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from pfi_rag import layout
from pfi_rag.config import PrivacyConfig
from pfi_rag.data.records import Document
from pfi_rag.storage import atomic_write_json, read_json

logger = logging.getLogger(__name__)

ID_PREFIX = "audit-canary-"
FORMAT = 1


@dataclass(frozen=True)
class AuditCanary:
    index: int
    prefix: str  # what the secret follows, e.g. "Audit note qzkfmwra: the access code is"
    secret: str  # `digits` random decimal digits
    inserted: bool  # True: a training record; False: a control, never trained on

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"

    @property
    def space_size(self) -> int:
        return 10 ** len(self.secret)

    def document(self) -> Document:
        return Document(id=f"{ID_PREFIX}{self.index:04d}", text=self.text, metadata={"audit_canary": True})


def generate(count: int, digits: int) -> list[AuditCanary]:
    """``count`` fresh canaries; inclusion bits and secrets from the OS (never a public seed)."""
    rng = secrets.SystemRandom()
    out = []
    for index in range(count):
        tag = "".join(rng.choice(string.ascii_lowercase) for _ in range(8))
        secret = "".join(rng.choice(string.digits) for _ in range(digits))
        prefix = f"Audit note {tag}: the access code is"
        out.append(AuditCanary(index=index, prefix=prefix, secret=secret, inserted=rng.random() < 0.5))
    return out


def load_canaries(data_root: Path, client_id: str) -> list[AuditCanary]:
    """The client's canaries, or [] when it has none (audit canaries never enabled)."""
    state = read_json(layout.client_canaries_file(data_root, client_id)) or {}
    return [AuditCanary(**c) for c in state.get("canaries", [])]


def insertions(data_root: Path, client_id: str) -> list[dict]:
    """The log of training calls that inserted the canaries (when, how many)."""
    return list((read_json(layout.client_canaries_file(data_root, client_id)) or {}).get("insertions", []))


def audit_training_documents(data_root: Path, client_id: str, cfg: PrivacyConfig) -> list[Document]:
    """The inserted canaries as training records ([] unless ``cfg.audit_canaries``), logged.

    Call it once per training call, where the client's training records are assembled. The
    canaries are created at the first call and then kept: the same half is inserted every time,
    so each canary is either in every training call of the client or in none.
    """
    if cfg.audit_canaries == 0:
        return []
    path = layout.client_canaries_file(data_root, client_id)
    state = read_json(path) or {}
    if not state.get("canaries"):
        state = {
            "format": FORMAT,
            "client_id": client_id,
            "created_at": _now(),
            "digits": cfg.audit_canary_digits,
            "canaries": [asdict(c) for c in generate(cfg.audit_canaries, cfg.audit_canary_digits)],
            "insertions": [],
        }
    elif len(state["canaries"]) != cfg.audit_canaries:
        logger.warning(
            "client %s keeps its %d audit canaries (privacy.audit_canaries = %d applies to new clients)",
            client_id,
            len(state["canaries"]),
            cfg.audit_canaries,
        )
    canaries = [AuditCanary(**c) for c in state["canaries"]]
    inserted = [c.document() for c in canaries if c.inserted]
    state.setdefault("insertions", []).append(
        {"at": _now(), "inserted": len(inserted), "controls": len(canaries) - len(inserted)}
    )
    atomic_write_json(path, state)
    return inserted


def is_audit_canary(document: Document) -> bool:
    return document.id.startswith(ID_PREFIX) and bool(document.metadata.get("audit_canary"))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
