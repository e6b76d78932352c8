"""Federation through real Flower: the simulation engine (Ray) and the Deployment Engine.

Each test runs a real federation on the tiny model, so they are few and share one main run.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pfi_rag.config import load_config
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.federation.checkpoint import load_checkpoint
from pfi_rag.federation.launcher import run_simulation
from pfi_rag.federation.records import read_round_records
from pfi_rag.federation.server import FederationFailed
from pfi_rag.federation.task import fresh_adapter, read_adapter_arrays
from pfi_rag.layout import client_adapter_dir, global_adapter_dir, round_record_files, simulation_dir
from pfi_rag.privacy import PrivacyLedger
from pfi_rag.privacy.accounting import epsilon_of
from tests.federation_support import capture_replies, captured_dir, tiny_federation_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, model_cache):
    """4 clients (client-03's data is corrupt, so it fails whenever sampled), 3 per round, 2 rounds,
    FedSA (only LoRA A is shared), each outgoing delta clipped to 1 and noised with sigma 0.5."""
    root = tmp_path_factory.mktemp("federation")
    synthesize(root, clients=4, seed=0)
    (root / "clients" / "client-03" / "data" / "documents.jsonl").write_text("{not json\n")
    cfg = tiny_federation_config(
        root,
        model_cache,
        **{
            "federation.clients": 4,
            "federation.clients_per_round": 3,
            "federation.rounds": 2,
            "federation.strategy": "fedsa",
            "federation.client_clip_norm": 1.0,
            "federation.client_noise_multiplier": 0.5,
        },
    )
    records = run_simulation(cfg, client_mods=[capture_replies])
    return cfg, records, captured_dir(root)


def test_rounds_tolerate_a_failing_client_and_count_it(main_run):
    cfg, records, _ = main_run
    assert [r.round for r in records] == [1, 2]
    assert records == read_round_records(cfg.data_root)
    for record in records:
        assert len(record.participants) == 3
        assert "client-03" not in record.results
        failed = [f.client for f in record.failures]
        assert failed == (["client-03"] if "client-03" in record.participants else [])
        assert len(record.results) + len(failed) == 3


def test_shared_part_changed_and_personal_part_stays_on_the_client(main_run):
    cfg, records, _ = main_run
    _, _, initial = fresh_adapter(cfg)
    checkpoint = load_checkpoint(cfg.data_root)
    assert checkpoint.round == 2
    assert all(".lora_A." in name for name in checkpoint.arrays)  # FedSA shares A only
    moved = [not np.allclose(checkpoint.arrays[n], initial[n]) for n in checkpoint.arrays]
    assert all(moved)
    trained = sorted({c for r in records for c in r.results})
    personal_b = {}
    for client in trained:
        arrays = read_adapter_arrays(client_adapter_dir(cfg.data_root, client))
        personal_b[client] = {n: a for n, a in arrays.items() if ".lora_B." in n}
        assert all(np.abs(b).sum() > 0 for b in personal_b[client].values())  # B left its zero init
    first, second = trained[0], trained[1]
    assert any(not np.allclose(personal_b[first][n], personal_b[second][n]) for n in personal_b[first])
    # The global adapter served to clients without one carries the shared A and an untrained B.
    global_arrays = read_adapter_arrays(global_adapter_dir(cfg.data_root))
    assert all(np.all(a == 0) for n, a in global_arrays.items() if ".lora_B." in n)
    assert not (Path(cfg.data_root) / "clients" / "client-03" / "adapter").exists()


def test_epsilon_per_client_composes_the_rounds_it_joined(main_run):
    cfg, records, _ = main_run
    for client in ("client-00", "client-01", "client-02"):
        joined = sum(client in r.results for r in records)
        ledger = PrivacyLedger.open(cfg.data_root, client, cfg.privacy)
        assert [s.kind for s in ledger.spends] == ["dp-sgd", "round-metrics"] * joined
        history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in ledger.spends]
        expected = epsilon_of(history, delta=ledger.delta, mechanism=ledger.mechanism) if joined else 0.0
        assert ledger.epsilon_spent == pytest.approx(expected, rel=1e-9)
        assert ledger.epsilon_spent <= joined * cfg.privacy.epsilon_per_round + 1e-6
        # The server never learns a client's epsilon (it is a function of n): not in the records.
        on_disk = [json.loads(p.read_text()) for p in round_record_files(cfg.data_root)]
        assert all("epsilon" not in r["updates"].get(client, {}) for r in on_disk)


def test_clients_send_only_noised_shared_arrays_and_metrics(main_run):
    cfg, records, captured = main_run
    sent = {p: pickle.loads(p.read_bytes()) for p in sorted(captured.glob("train-*.pkl"))}
    # A failing client (client-03's corrupt data) sends a code and nothing else.
    failed = [reply for reply in sent.values() if reply["privacy"].get("status") != "ok"]
    assert len(failed) == sum(len(r.failures) for r in records)
    assert all(reply == {"privacy": {"status": "failed", "error": "bad_local_data"}} for reply in failed)
    paths = [p for p, reply in sent.items() if reply["privacy"].get("status") == "ok"]
    replies = [sent[p] for p in paths]
    assert len(replies) == sum(len(r.results) for r in records)
    documents = [
        doc["text"]
        for client in ("client-00", "client-01", "client-02")
        for doc in map(json.loads, (cfg.data_root / "clients" / client / "data" / "documents.jsonl").open())
    ]
    record_counts = set()
    for client in ("client-00", "client-01", "client-02"):
        data = load_client_data(cfg.data_root, client)
        record_counts.add(float(len(data.documents) + len(data.instructions)))
    for path, reply in zip(paths, replies, strict=True):
        assert set(reply) == {"update", "metrics", "privacy"}
        assert reply["update"] and all(".lora_A." in name for name in reply["update"])
        # The metrics are the private release: the record count is noised, no timing is sent.
        assert set(reply["metrics"]) == {"num-examples", "loss-before", "loss-after"}
        assert reply["metrics"]["num-examples"] not in record_counts
        assert reply["privacy"]["round_metrics"] == "private" and reply["privacy"]["status"] == "ok"
        assert reply["privacy"]["update_noise_multiplier"] == 0.5
        assert not {"noise_multiplier", "sample_rate", "epsilon"} & set(reply["privacy"])  # reveal n
        raw = path.read_bytes()
        for text in documents:
            assert text[:40].encode() not in raw
        # The delta was clipped to norm 1 then noised with std 0.5: entries look like N(0, 0.5^2).
        values = np.concatenate([a.ravel() for a in reply["update"].values()])
        assert values.size > 1000
        assert 0.45 < values.std() < 0.55
    # The round records say the metrics were noised, and by about how much.
    for record in records:
        assert all(m.noised and m.loss_std > 0 for m in record.metrics.values())


def _flower_imports(path: Path) -> set[str]:
    """Every Flower module (and ``module.name``) a source file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] == "flwr"}


def test_no_deprecated_flower_api_is_used(main_run):
    # Flower 1.42 deprecates flwr.simulation.run_simulation, and flwr/simulation/__init__.py imports
    # it: importing anything from flwr.simulation loads it. pfi-rag and its benchmarks import none.
    repo = Path(__file__).resolve().parents[1]
    sources = [*(repo / "pfi_rag").rglob("*.py"), *(repo / "bench").rglob("*.py")]
    used = {str(p.relative_to(repo)): _flower_imports(p) for p in sources}
    assert used["pfi_rag/federation/server_app.py"]  # the scan sees Flower imports
    assert not {p: names for p, names in used.items() if any(n.startswith("flwr.simulation") for n in names)}
    # The run went through Flower's simulation runtime behind the launcher's SuperLink, and no
    # process of it printed Flower's deprecation banner.
    cfg, _, _ = main_run
    logs = {p.name: p.read_text() for p in (simulation_dir(cfg.data_root) / "logs").glob("*.log")}
    assert "Starting Flower SuperLink" in logs["superlink.log"]
    assert "Starting Flower Simulation" in logs["run.log"]
    assert not [name for name, text in logs.items() if "DEPRECATED" in text]


def test_every_client_failing_ends_the_run_loudly(tmp_path, model_cache):
    synthesize(tmp_path, clients=2, seed=0)
    for client in ("client-00", "client-01"):
        (tmp_path / "clients" / client / "data" / "documents.jsonl").write_text("{broken\n")
    cfg = tiny_federation_config(tmp_path, model_cache, **{"federation.clients": 2, "federation.rounds": 2})
    with pytest.raises(FederationFailed, match=r"round 1: 0 results, 2 failures.*client-00.*client-01"):
        run_simulation(cfg)
    assert load_checkpoint(tmp_path) is None
    assert read_round_records(tmp_path)[0].status == "failed"


def _federate_command(root: Path, model_cache: Path, rounds: int) -> list[str]:
    sets = [
        "models.generator=tiny-random",
        f"models.cache_dir={model_cache}",
        "privacy.local_steps=2",
        "privacy.batch_size=4",
        "privacy.max_seq_len=48",
        "privacy.epsilon_per_round=4",
        "privacy.epsilon_max=100",
    ]
    flags = [arg for item in sets for arg in ("--set", item)]
    return [
        sys.executable,
        "-m",
        "pfi_rag",
        "--data-root",
        str(root),
        *flags,
        "federate",
        "--clients",
        "2",
        "--rounds",
        str(rounds),
    ]


def test_a_killed_server_resumes_at_the_next_round(tmp_path, model_cache):
    synthesize(tmp_path, clients=2, seed=0)
    command = _federate_command(tmp_path, model_cache, rounds=2)
    first = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = tmp_path / "federation" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 900
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole launcher: server, Ray and its workers
    first.wait()
    assert checkpoint.exists(), "the first launcher wrote no checkpoint before it was killed"
    resumed_from = load_checkpoint(tmp_path).round
    assert resumed_from in (1, 2)

    # -X importtime: the second launcher lists every module it imported on stderr.
    second = subprocess.run(
        [sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True, check=False
    )
    assert second.returncode == 0, second.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines() if "|" in line}
    assert "pfi_rag.federation.launcher" in imported and "flwr.simulation" not in imported
    assert "DEPRECATED" not in second.stdout + second.stderr
    # A finished round is never run again; round 2 runs only if the kill came before it finished.
    assert "round 1:" not in second.stdout
    assert ("round 2:" in second.stdout) == (resumed_from == 1), second.stdout[-2000:]
    assert [r.round for r in read_round_records(tmp_path)] == [1, 2]
    ledger = PrivacyLedger.open(tmp_path, "client-00", load_config().privacy)
    # One DP-SGD spend per finished round; a round cut short by the kill may have spent too (its noise
    # was drawn from the client's data), and that spend stays counted.
    assert [s.kind for s in ledger.spends].count("dp-sgd") in (2, 3)
