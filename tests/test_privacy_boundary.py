"""What crosses a client's boundary: every field of a reply is DP-noised or fixed by configuration,
and a failure reaches the server as a code, never as the text of a record.

The real Flower ClientApp (with a client mod that records every reply, as a deployment's audit
would) is called with real Flower messages; the server side is the real round collection over
those replies. The noise is drawn from the OS, as for every real client: the noised values differ
between any two runs, so the tests compare which fields are sent and every non-noised value.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from pfi_rag.data.corpus import load_corpus
from pfi_rag.data.synth import synthesize
from pfi_rag.federation.client_app import make_client_app
from pfi_rag.federation.protocol import ARRAYS, CONFIG, PRIVACY, UPDATE, to_array_record
from pfi_rag.federation.strategies import shared_part
from pfi_rag.federation.task import FAILURE_CODES, fresh_adapter
from pfi_rag.layout import (
    client_data_dir,
    client_log_file,
    client_timings_file,
    federation_dir,
    simulation_dir,
)
from tests.federation_support import tiny_federation_config

CLIENT = "client-00"
# Fields that carry the DP-noised values; everything else must be equal between the two clients.
NOISED_METRICS = {"num-examples", "loss-before", "loss-after"}


class Capture:
    """A Flower client mod: keeps every reply the client sends, as the server will get it."""

    def __init__(self):
        self.replies: list[Message] = []

    def __call__(self, msg, context, call_next):
        reply = call_next(msg, context)
        self.replies.append(reply)
        return reply


def train_message(global_arrays: dict, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            ARRAYS: to_array_record(global_arrays),
            CONFIG: ConfigRecord({"server-round": server_round, "strategy": "fedavg"}),
        }
    )
    # As the SuperNode hands it to the ClientApp: with a run id and message id.
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def run_one_round(root: Path, model_cache: Path, **overrides) -> Message:
    """One client's train round through the real ClientApp; returns what it sent."""
    cfg = tiny_federation_config(root, model_cache, **overrides)
    capture = Capture()
    app = make_client_app(cfg, mods=[capture])
    global_arrays = shared_part(fresh_adapter(cfg)[2], "fedavg")
    node_config = {"client-id": CLIENT}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    app(train_message(global_arrays), context)
    assert len(capture.replies) == 1
    return capture.replies[0]


def fields(reply: Message) -> dict:
    """Every field of a reply's content: record -> key -> (kind, value or shape/dtype)."""
    out = {}
    for record_name in reply.content.keys():
        record = reply.content[record_name]
        if record_name == UPDATE:
            out[record_name] = {k: ("array", record[k].shape, record[k].dtype) for k in record.keys()}
        else:
            out[record_name] = {k: record[k] for k in record.keys()}
    return out


def add_instruction(root: Path, text: str) -> None:
    path = client_data_dir(root, CLIENT) / "instructions.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text + "\n")


def test_two_clients_one_record_apart_send_replies_that_differ_only_in_noised_values(tmp_path, model_cache):
    # Prepare: the same synthetic client twice; the second has one more instruction
    for name in ("small", "large"):
        synthesize(tmp_path / name, clients=1, seed=0)
    add_instruction(tmp_path / "large", json.dumps({"prompt": "One more?", "response": "Yes, one more."}))

    # Execute: one round each, same configuration
    small = run_one_round(tmp_path / "small", model_cache)
    large = run_one_round(tmp_path / "large", model_cache)

    # Assert: same records, same keys, same array names/shapes/dtypes, equal configuration values;
    # only the noised metrics (and the noised arrays' values) may differ
    assert not small.has_error() and not large.has_error()
    a, b = fields(small), fields(large)
    assert set(a) == set(b) == {UPDATE, "metrics", PRIVACY}
    assert a[UPDATE] == b[UPDATE]
    assert set(a["metrics"]) == set(b["metrics"]) == NOISED_METRICS
    assert a[PRIVACY] == b[PRIVACY], "a privacy field depends on the client's records"
    assert a[PRIVACY]["status"] == "ok"
    for forbidden in ("epsilon", "sample_rate", "steps", "train-seconds"):
        assert forbidden not in a[PRIVACY] and forbidden not in a["metrics"]


def test_the_round_metrics_cost_the_same_evaluation_for_a_small_and_a_large_client(tmp_path, model_cache):
    # Prepare: the same synthetic client twice, the second with 60 more records; a sample size
    # between the two record counts, so one client pads its sample and the other draws from it
    for name in ("small", "large"):
        synthesize(tmp_path / name, clients=1, seed=0)
    for i in range(60):
        record = {"prompt": f"Question {i}?", "response": f"Answer {i}."}
        add_instruction(tmp_path / "large", json.dumps(record))
    sample = 80
    sizes = {}
    for name in ("small", "large"):
        corpus = load_corpus(tmp_path / name, CLIENT, held_out_share=0.2)
        sizes[name] = len(corpus.train) + len(corpus.instructions)
    assert sizes["small"] < sample < sizes["large"]

    # Execute: one round each; the small client also holds its reply to a deadline it cannot meet
    deadlines = {"small": 1e-3, "large": None}
    for name in ("small", "large"):
        overrides = {"privacy.round_metrics_sample": sample, "federation.reply_after_s": deadlines[name]}
        reply = run_one_round(tmp_path / name, model_cache, **overrides)
        assert not reply.has_error() and reply.content[PRIVACY]["round_metrics_sample"] == sample

    # Assert: each client's own timing log says how many records its loss evaluation ran the model
    # on (before, and again after, training): the sample size for both, whatever the record count
    for name in ("small", "large"):
        timings = json.loads(client_timings_file(tmp_path / name, CLIENT).read_text())
        assert timings["evaluated"] == sample, name
        assert {"evaluate", "dp_steps", "plan"} <= set(timings["phases"])
    # An overrun deadline is told to the client's own log (and the reply still went out)
    assert "reply_late" in client_log_file(tmp_path / "small", CLIENT).read_text()
    assert not client_log_file(tmp_path / "large", CLIENT).exists()


def test_a_secret_in_a_malformed_record_never_reaches_the_server(tmp_path, model_cache, caplog):
    # Prepare: a record that fails validation and quotes its own contents in the exception
    secret = "HIV positive, started PrEP 2026-03-02"
    synthesize(tmp_path, clients=1, seed=0)
    add_instruction(tmp_path, json.dumps({"prompt": "What did I note?", "respons": secret}))

    # Execute: the round through the real ClientApp, then the server's collection of the reply
    with caplog.at_level(logging.DEBUG):
        reply = run_one_round(tmp_path, model_cache)
    from pfi_rag.federation.server import RoundOutcome

    outcome = RoundOutcome(round=1, participants=[CLIENT])
    info = dict(reply.content[PRIVACY])
    outcome.failures.append({"client": CLIENT, "error": info["error"]})

    # Assert: a code from the closed vocabulary; the secret is nowhere the server can see or write
    assert not reply.has_error()
    assert set(reply.content.keys()) == {PRIVACY}
    assert info == {"status": "failed", "error": "bad_local_data"}
    assert info["error"] in FAILURE_CODES
    sent = repr(fields(reply)) + repr(reply.metadata)
    assert secret not in sent and "PrEP" not in sent
    assert "PrEP" not in caplog.text  # the process log the server shares in a simulation
    local_log = client_log_file(tmp_path, CLIENT).read_text()
    assert "PrEP" in local_log  # the details stay with the client, for its owner to read


@pytest.mark.slow
def test_round_records_hold_failure_codes_only(tmp_path, model_cache):
    """Through a real simulation: the round record, the launcher's error and Flower's logs of a round
    failed by a client with a secret-bearing bad record."""
    from pfi_rag.federation.launcher import run_simulation
    from pfi_rag.federation.server import FederationFailed

    secret = "HIV positive, started PrEP 2026-03-02"
    synthesize(tmp_path, clients=1, seed=0)
    add_instruction(tmp_path, json.dumps({"prompt": "What did I note?", "respons": secret}))
    cfg = tiny_federation_config(tmp_path, model_cache, **{"federation.clients": 1, "federation.rounds": 1})

    with pytest.raises(FederationFailed) as failed:
        run_simulation(cfg)

    assert "bad_local_data" in str(failed.value) and "PrEP" not in str(failed.value)
    stored = "".join(p.read_text() for p in federation_dir(tmp_path).rglob("*.json"))
    assert "bad_local_data" in stored and "PrEP" not in stored
    # Flower's and Ray's logs of the run (the SuperLink, the ServerApp, the ClientApps' workers):
    # they hold the failure's code, and never the secret.
    logs = {p.name: p.read_bytes() for p in (simulation_dir(tmp_path) / "logs").glob("*.log")}
    assert {"superlink.log", "run.log"} <= set(logs)
    assert b"bad_local_data" in logs["run.log"]
    assert not [name for name, raw in logs.items() if b"PrEP" in raw]
    assert "PrEP" in client_log_file(tmp_path, CLIENT).read_text()  # where its owner reads it
