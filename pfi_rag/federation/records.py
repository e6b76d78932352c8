"""What the federation leaves on the server's disk: one record per round and the run's summary.

Written by the federation (:func:`pfi_rag.federation.server.run_rounds`,
:func:`pfi_rag.federation.launcher.summarize`) and read by the probes
(:mod:`pfi_rag.probes.history`), the CLI and the tests, all through these types: a key the
writer renames is a validation error at the reader, not a value that silently reads as missing.

This module imports neither Flower nor Ray, so the probes can read the history cheaply.

Where they live: :func:`pfi_rag.layout.round_record_file` (``federation/rounds/round-0001.json``,
a RoundRecord) and :func:`pfi_rag.layout.summary_file` (``federation/summary.json``, a
FederationSummary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pfi_rag import layout
from pfi_rag.storage import atomic_write_json


class RecordError(ValueError):
    """A round or summary file is unreadable or malformed; the message names the file."""


class _Record(BaseModel):
    # forbid: a renamed key (``loss-before`` for ``loss_before``) fails where it is read.
    model_config = ConfigDict(extra="forbid")


class Failure(_Record):
    client: str
    error: str  # a code from federation.task.FAILURE_CODES (or flower_error_N), never exception text


class SatOut(_Record):
    client: str
    reason: str  # a code from federation.task.FAILURE_CODES


class UpdateStats(_Record):
    """One client's update as the server saw it, before aggregation."""

    norm: float
    cosine_to_mean: float | None = None
    num_examples: int | None = None  # the released count (noised unless metrics are exact)


class ClientMetrics(_Record):
    """A client's round metrics as it released them (``noised``) or, for a trusted server, exactly."""

    num_examples: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    noised: bool = False
    loss_std: float | None = None  # about how far a released mean loss may be from the true one
    train_seconds: float | None = None  # exact metrics only


class ServerDP(_Record):
    noise_multiplier: float = 0.0
    clip_norm: float | None = None
    epsilon: float | None = None  # client-level, after this round; None without server noise
    delta: float | None = None


class RoundRecord(_Record):
    """What happened in one round. A failed round (too few results) has no updates or metrics."""

    round: int = Field(ge=1)
    status: Literal["ok", "failed"] = "ok"
    strategy: str = ""
    aggregation: str = "fedavg"
    participants: list[str] = Field(default_factory=list)  # sampled this round
    results: list[str] = Field(default_factory=list)  # sent an update
    failures: list[Failure] = Field(default_factory=list)
    sat_out: list[SatOut] = Field(default_factory=list)
    updates: dict[str, UpdateStats] = Field(default_factory=dict)
    aggregate_norm: float | None = None
    metrics: dict[str, ClientMetrics] = Field(default_factory=dict)
    server_dp: ServerDP | None = None
    seconds: float | None = None


class RoundRow(_Record):
    """One round in the summary."""

    round: int
    participants: int
    results: int
    failures: int
    sat_out: int
    aggregate_norm: float | None = None
    server_epsilon: float | None = None
    status: str = "ok"


class ClientRow(_Record):
    """One client in the summary: losses of its first and last round, its latest update norm."""

    rounds: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    loss_std: float | None = None  # None: exact metrics
    update_norm: float | None = None
    epsilon: float | None = None  # spent, from the client's ledger


class FederationSummary(_Record):
    strategy: str
    aggregation: str
    round_metrics: str  # "private" (released with noise) or "exact"
    rounds: list[RoundRow] = Field(default_factory=list)
    clients: dict[str, ClientRow] = Field(default_factory=dict)


def write_round_record(data_root: Path, record: RoundRecord) -> Path:
    path = layout.round_record_file(data_root, record.round)
    atomic_write_json(path, record.model_dump(mode="json"))
    return path


def _problems(exc: ValidationError) -> str:
    """A validation error on one line: each field's path and what is wrong with it."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())


def read_round_record(path: Path) -> RoundRecord:
    try:
        return RoundRecord.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise RecordError(f"{path}: not readable ({exc})") from None
    except ValidationError as exc:
        raise RecordError(f"{path}: not a valid round record ({_problems(exc)})") from None


def read_round_records(data_root: Path) -> list[RoundRecord]:
    """Every recorded round, in round order (empty when the federation never ran)."""
    return [read_round_record(path) for path in layout.round_record_files(data_root)]


def write_summary(data_root: Path, summary: FederationSummary) -> Path:
    path = layout.summary_file(data_root)
    atomic_write_json(path, summary.model_dump(mode="json"))
    return path


def read_summary(data_root: Path) -> FederationSummary | None:
    path = layout.summary_file(data_root)
    if not path.is_file():
        return None
    try:
        return FederationSummary.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise RecordError(f"{path}: not a valid federation summary ({_problems(exc)})") from None
