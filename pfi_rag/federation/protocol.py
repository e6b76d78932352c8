"""What the server and a client say to each other: the records inside Flower messages.

Both apps (:mod:`~pfi_rag.federation.client_app`, :mod:`~pfi_rag.federation.server`) build and
read messages through these names, so a key exists in one place only.

- identity query (server -> client): ``config = {ask: "identity"}``; the reply is
  ``config = {client-id}``.
- train (server -> client): ``arrays`` (the global shared part), ``config = {server-round,
  strategy}``.
- train reply: ``update`` (ArrayRecord), ``metrics`` (``num-examples``, ``loss-before``,
  ``loss-after``; ``train-seconds`` only with exact metrics), ``privacy`` (ConfigRecord,
  ``status`` and configuration; see :mod:`pfi_rag.federation.task` for every field). A client
  without an update replies only ``privacy = {status: "sat_out" | "failed", error: CODE}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# Records inside messages, both directions.
ARRAYS, CONFIG = "arrays", "config"
UPDATE, METRICS, PRIVACY = "update", "metrics", "privacy"

# The identity query and its reply.
ASK, IDENTITY_QUERY, CLIENT_ID = "ask", "identity", "client-id"

# A train message's config.
SERVER_ROUND, STRATEGY = "server-round", "strategy"

# A train reply's metrics (the privately released ones are named the same,
# see pfi_rag.privacy.round_metrics).
NUM_EXAMPLES, LOSS_BEFORE, LOSS_AFTER = "num-examples", "loss-before", "loss-after"
TRAIN_SECONDS = "train-seconds"

# A train reply's privacy status, and the error code beside a status other than ok.
STATUS, ERROR = "status", "error"
OK, SAT_OUT, FAILED = "ok", "sat_out", "failed"

# The closed vocabulary of what a client may tell the server about why it has no update.
FAILURE_CODES = (
    "budget_exhausted",  # the round's spend would pass the client's budget: it sat out
    "bad_local_data",  # its records could not be read
    "bad_local_settings",  # its configuration or settings.toml is invalid
    "privacy_refused",  # e.g. delta not below 1/n, an adapter its ledger does not account for
    "training_failed",  # anything else
)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record.keys()}


def identity_query() -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({ASK: IDENTITY_QUERY})})


def identity_reply(client_id: str) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({CLIENT_ID: client_id})})


def train_message(global_arrays: Mapping[str, np.ndarray], server_round: int, strategy: str) -> RecordDict:
    return RecordDict(
        {
            ARRAYS: to_array_record(global_arrays),
            CONFIG: ConfigRecord({SERVER_ROUND: server_round, STRATEGY: strategy}),
        }
    )


def train_reply(
    update: Mapping[str, np.ndarray], metrics: Mapping[str, float], privacy: Mapping[str, float | int | str]
) -> RecordDict:
    """A client's update, its (released) metrics and its privacy record; ``privacy`` holds ``status``."""
    return RecordDict(
        {
            UPDATE: to_array_record(update),
            METRICS: MetricRecord(dict(metrics)),
            PRIVACY: ConfigRecord(dict(privacy)),
        }
    )


def no_update_reply(status: str, code: str) -> RecordDict:
    """A client that sat out or failed: its status and a code from ``task.FAILURE_CODES`` only."""
    return RecordDict({PRIVACY: ConfigRecord({STATUS: status, ERROR: code})})
