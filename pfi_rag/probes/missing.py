"""One line per thing a probe may lack: what is missing and the command that provides it.

Every skip in the suite is one of these, so an operator reading a skipped row knows what to run.
"""

from __future__ import annotations

NO_HISTORY = "no federation history: run `pfi-rag federate` (it records every round)"
NO_ROUND_CHECKPOINTS = "no saved round of the global adapter: run `pfi-rag federate` (each round is kept)"
TWO_CLIENTS = "needs at least two clients: ingest another with `pfi-rag ingest --client NAME DIR/`"


def no_adapter(client: str) -> str:
    return f"client has no adapter: train it with `pfi-rag train --client {client}` or `pfi-rag federate`"


def no_index(client: str) -> str:
    return f"client has no document store: add its documents with `pfi-rag ingest --client {client} DIR/`"


def no_items(client: str) -> str:
    return (
        "no held-out documents to make evaluation items from: add documents with "
        f"`pfi-rag ingest --client {client} DIR/` (a data.held_out_share of them is held out)"
    )


def no_members(client: str) -> str:
    return (
        "needs documents on both sides of the client's split (trained on and held out): add more with "
        f"`pfi-rag ingest --client {client} DIR/`"
    )


def no_audit_canaries(client: str) -> str:
    return (
        "no audit canaries: turn them on and train, e.g. "
        f"`pfi-rag --set privacy.audit_canaries=64 train --client {client}`"
    )


def no_ledger(client: str) -> str:
    return f"client has no privacy ledger: train it with DP-SGD (`pfi-rag train --client {client}`)"
