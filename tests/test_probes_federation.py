"""History-based probes, the budget audit, the private release and the CLI gate.

Round files are written through the federation's own type (federation/records.py), one of them
by the server's own round-closing code; ledgers are written by hand in the format probes/budget.py
documents.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.config import Config
from pfi_rag.federation.records import (
    ClientMetrics,
    Failure,
    RoundRecord,
    UpdateStats,
    write_round_record,
)
from pfi_rag.layout import client_adapter_dir, client_ledger_file, client_probe_results_file
from pfi_rag.probes import ProbeContext, Verdict, run_suite
from pfi_rag.probes.budget import BudgetProbe
from pfi_rag.probes.history import HistoryError, read_history
from pfi_rag.probes.registry import probe_named
from pfi_rag.probes.release import TOLERANCE_Z, distribution
from pfi_rag.probes.silent_failures import SilentFailuresProbe
from pfi_rag.probes.update_outliers import UpdateOutliersProbe
from tests.probe_support import fresh_lora, make_context, make_data, save

CLIENTS = ["client-00", "client-01", "client-02", "client-03"]


# One torch thread for the module (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_round(root, number, *, norms, cosines=None, failures=(), participants=None, metrics=None):
    cosines = cosines or {c: 0.9 for c in norms}
    metrics = metrics or {c: {"loss_before": 2.0, "loss_after": 1.5} for c in norms}
    record = RoundRecord(
        round=number,
        strategy="fedavg",
        participants=list(participants if participants is not None else norms),
        results=sorted(norms),
        failures=[Failure(client=c, error="training_failed") for c in failures],
        updates={
            c: UpdateStats(norm=n, cosine_to_mean=cosines[c], num_examples=10) for c, n in norms.items()
        },
        aggregate_norm=1.0,
        metrics={c: ClientMetrics(**m) for c, m in metrics.items()},
    )
    write_round_record(root, record)


def healthy_rounds(root, count=3, metrics=None):
    for number in range(1, count + 1):
        write_round(root, number, norms={c: 1.0 + 0.05 * i for i, c in enumerate(CLIENTS)}, metrics=metrics)


@pytest.fixture()
def root(tmp_path):
    make_data(tmp_path, clients=4)
    return tmp_path


def test_history_reader_reads_rounds_in_order_and_names_bad_files(root):
    write_round(root, 2, norms={"client-00": 1.0})
    write_round(root, 1, norms={"client-00": 2.0})
    assert [r.number for r in read_history(root)] == [1, 2]
    assert read_history(root)[0].updates["client-00"].norm == 2.0
    (root / "federation" / "rounds" / "round-0003.json").write_text("{not json")
    with pytest.raises(HistoryError, match="round-0003.json"):
        read_history(root)


def test_a_round_the_server_closes_reads_back_as_the_same_record_in_the_probes(root):
    """The server's own code builds and writes the record from what clients sent (Flower's
    metric names); the probes read the same type, and the client that failed is found (one round is
    too few to judge a loss that did not fall)."""
    from pfi_rag.federation.protocol import LOSS_AFTER, LOSS_BEFORE, NUM_EXAMPLES
    from pfi_rag.federation.server import RoundOutcome, close_round

    cfg = Config(data_root=root)
    rng = np.random.default_rng(0)
    outcome = RoundOutcome(round=1, participants=CLIENTS[:3])
    for i, client in enumerate(CLIENTS[:2]):
        outcome.results[client] = {
            "update": {"layer.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32)},
            "metrics": {NUM_EXAMPLES: 10.0 + i, LOSS_BEFORE: 2.0, LOSS_AFTER: 2.5 if i == 0 else 1.5},
            "privacy": {"status": "ok", "round_metrics": "exact"},
        }
    outcome.failures.append(Failure(client=CLIENTS[2], error="bad_local_data"))
    record, delta = close_round(outcome, cfg, rng, population=4, started=time.perf_counter())
    write_round_record(root, record)

    (read,) = read_history(root)
    assert isinstance(read, RoundRecord) and read.number == 1 and delta is not None
    assert read.model_dump(exclude={"path", "adapter_dir"}) == record.model_dump()
    assert read.metrics["client-00"].loss_before == 2.0 and read.metrics["client-00"].noised is False
    assert read.updates["client-01"].num_examples == 11
    found = SilentFailuresProbe().run_federation(ProbeContext(cfg), CLIENTS[:3]).evidence["problems"]
    assert {(p["client"], p["why"].split(" ")[0]) for p in found} == {("client-02", "failed:")}
    # A key the record does not know (a renamed field) is an error naming the file, not a gap.
    raw = json.loads(record.model_dump_json())
    raw["metrics"]["client-00"]["loss-before"] = raw["metrics"]["client-00"].pop("loss_before")
    (root / "federation" / "rounds" / "round-0001.json").write_text(json.dumps(raw))
    with pytest.raises(HistoryError, match="round-0001.json.*loss-before"):
        read_history(root)


def test_update_outliers_flags_a_poisoned_update(root):
    healthy_rounds(root)
    ctx = ProbeContext(Config(data_root=root))
    clean = UpdateOutliersProbe().run_federation(ctx, CLIENTS)

    norms = {c: 1.0 + 0.05 * i for i, c in enumerate(CLIENTS)} | {"client-02": 25.0}
    cosines = {c: 0.9 for c in CLIENTS} | {"client-01": -0.8}
    write_round(root, 4, norms=norms, cosines=cosines)
    planted = UpdateOutliersProbe().run_federation(ProbeContext(Config(data_root=root)), CLIENTS)

    assert clean.verdict == Verdict.PASS and clean.value == 0
    assert planted.verdict == Verdict.FAIL
    assert {(o["round"], o["client"]) for o in planted.evidence["outliers"]} == {
        (4, "client-02"),
        (4, "client-01"),
    }


def test_silent_failures_flags_errors_no_ops_and_absent_clients(root):
    healthy_rounds(root)
    clean = SilentFailuresProbe().run_federation(ProbeContext(Config(data_root=root)), CLIENTS)
    # A loss that rose in one round (DP noise does that), or noised metrics, are no failure.
    write_round(
        root,
        4,
        norms={c: 1.0 for c in CLIENTS},
        metrics={
            "client-00": {"loss_before": 2.0, "loss_after": 2.1},
            "client-01": {"loss_before": 2.0, "loss_after": 9.0, "noised": True},
        },
    )
    noisy = SilentFailuresProbe().run_federation(ProbeContext(Config(data_root=root)), CLIENTS)

    # client-00 learns in no round at all.
    stuck = {c: {"loss_before": 2.0, "loss_after": 2.0 if c == "client-00" else 1.5} for c in CLIENTS}
    healthy_rounds(root, metrics=stuck)
    norms = {"client-00": 1.0, "client-01": 0.0}
    write_round(
        root,
        4,
        norms=norms,
        failures=["client-02"],
        participants=["client-00", "client-01", "client-02", "client-03"],
        metrics={"client-00": {"loss_before": 2.0, "loss_after": 2.1}},
    )
    planted = SilentFailuresProbe().run_federation(ProbeContext(Config(data_root=root)), CLIENTS)
    whys = {(p["client"], p["why"].split(":")[0].split(" ")[0]) for p in planted.evidence["problems"]}

    assert clean.verdict == Verdict.PASS and noisy.verdict == Verdict.PASS
    assert planted.verdict == Verdict.FAIL
    assert whys == {
        ("client-02", "failed"),
        ("client-03", "selected,"),
        ("client-01", "zero-norm"),
        ("client-00", "loss"),
    }


def write_ledger(root, client, spends, **top):
    path = client_ledger_file(root, client)
    path.write_text(json.dumps({"epsilon_max": 8.0, "delta": 1e-5, "spends": spends, **top}))


def spend(epsilon_after, sigma=1.0):
    return {
        "when": "2026-01-01",
        "noise_multiplier": sigma,
        "sample_rate": 0.01,
        "steps": 1000,
        "epsilon_after": epsilon_after,
    }


def test_budget_audit_flags_theatre_and_resets(root):
    # Opacus RDP: sigma 1, q 0.01, 1000 steps, delta 1e-5 -> epsilon 2.10 (known value); two such
    # spends compose to about 3.
    write_ledger(root, "client-00", [spend(2.1014), spend(3.1)])
    write_ledger(root, "client-01", [spend(2.1014), spend(2.1014)])  # each round counted alone
    write_ledger(root, "client-02", [spend(2.1014), spend(9.0, sigma=0.0)])  # no noise, over budget
    ctx = ProbeContext(Config(data_root=root))
    clean, reset, theatre = (BudgetProbe().run_client(ctx, c) for c in CLIENTS[:3])

    assert clean.verdict == Verdict.PASS, clean.evidence["violations"]
    assert clean.evidence["epsilon_recomputed"] == pytest.approx(3.0, abs=0.3)
    assert reset.verdict == Verdict.FAIL and "not carried" in " ".join(reset.evidence["violations"])
    assert theatre.verdict == Verdict.FAIL
    text = " ".join(theatre.evidence["violations"])
    assert "no noise applied" in text and "exceeds the budget" in text


def test_budget_audit_flags_an_adapter_without_ledger_and_unaccounted_rounds(root, tiny_generator):
    save(fresh_lora(tiny_generator), client_adapter_dir(root, "client-03"))
    write_ledger(root, "client-00", [spend(2.1014)])
    healthy_rounds(root, count=2)  # client-00 took part twice but the ledger holds one spend
    ctx = ProbeContext(Config(data_root=root))
    assert BudgetProbe().run_client(ctx, "client-03").verdict == Verdict.FAIL
    result = BudgetProbe().run_client(ctx, "client-00")
    assert result.verdict == Verdict.FAIL and "2 federation rounds" in " ".join(result.evidence["violations"])


def test_private_report_matches_plain_within_stated_noise(root, tiny_models_config, tiny_generator):
    from pfi_rag.config import PrivacyConfig
    from pfi_rag.privacy import PrivacyLedger

    for client in CLIENTS:
        save(fresh_lora(tiny_generator), client_adapter_dir(root, client))
        # A real ledger (the release is charged to it): sigma 1, q 0.01, 1000 steps -> epsilon 2.10.
        ledger = PrivacyLedger.open(root, client, PrivacyConfig(accountant="rdp"))
        ledger.commit({"history": [(1.0, 0.01, 1000)], "mechanism": "rdp"}, records=1000, max_grad_norm=1.0)
    healthy_rounds(root, count=1)
    ctx = make_context(root, tiny_models_config, tiny_generator, config={"probes": {"exposure_samples": 32}})

    plain = run_suite(ctx, suite="privacy", private=False)
    private = run_suite(ctx, suite="privacy", private=True, rng=np.random.default_rng(0))

    assert private.per_client == [] and len(private.releases) == len(CLIENTS)
    assert private.privacy["epsilon_per_client"] == 1.0
    compared = 0
    for plain_summary, private_summary in zip(plain.summaries, private.summaries, strict=True):
        if private_summary.sigma is None:
            continue
        probe = probe_named(plain_summary.probe)
        lo, hi = probe.bounds[probe.metric]
        clipped = [
            min(max(r.value, lo), hi)
            for r in plain.per_client
            if r.probe == probe.name and r.value is not None
        ]
        truth = distribution(clipped, fails_above=probe.fails_above)
        for stat in ("worst", "p10", "p50", "p90", "mean"):
            assert abs(private_summary.distribution[stat] - truth[stat]) <= private_summary.tolerance
        assert private_summary.tolerance == pytest.approx(TOLERANCE_Z * private_summary.sigma)
        compared += 1
    assert compared >= 3  # exposure, membership, budget, dp_collapse released
    # Each client's release is charged to its privacy ledger, and its exact results stayed local.
    ledger = PrivacyLedger.open(root, "client-00", PrivacyConfig())
    assert [s.kind for s in ledger.spends] == ["dp-sgd", "probe-release"]
    assert 0.99 <= ledger.spends[-1].epsilon_spent <= 1.0 + 1e-9
    assert private.privacy["epsilon_spent_total"]["client-00"] == ledger.epsilon_spent
    assert client_probe_results_file(root, "client-00").is_file()


def test_cli_gates_on_failures_and_bad_input(root, isolated_env):
    runner = CliRunner()
    base = ["--data-root", str(root), "probe", "--suite", "federation", "--out", str(root / "report")]
    healthy_rounds(root)
    ok = runner.invoke(app, base)
    write_round(root, 4, norms={c: 1.0 for c in CLIENTS} | {"client-02": 40.0})
    flagged = runner.invoke(app, base)
    bad_suite = runner.invoke(app, ["--data-root", str(root), "probe", "--suite", "nope"])
    bad_client = runner.invoke(app, ["--data-root", str(root), "probe", "--clients", "ghost"])

    assert ok.exit_code == 0, ok.output
    assert flagged.exit_code == 1, flagged.output
    assert bad_suite.exit_code == 2 and bad_client.exit_code == 2
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["verdict"] == "fail"
    outliers = next(p for p in report["probes"] if p["probe"] == "update_outliers")
    assert outliers["verdict"] == "fail"
    assert (root / "report" / "report.html").read_text().startswith("<!doctype html>")
