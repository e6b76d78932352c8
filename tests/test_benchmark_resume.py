"""A benchmark matrix accumulates over invocations: finished runs with the same settings are
reused, a run cut mid-way is run again, other settings are refused until --fresh.

The runs here are written to the work log as a finished invocation would have written them, so
no federation has to run to show what is reused (the real runs' path: tests/test_benchmark.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfi_rag.benchmark.runs import PRESETS
from pfi_rag.benchmark.scenarios import TARGET
from pfi_rag.benchmark.worklog import (
    RUNS_FILE,
    SETTINGS_FILE,
    SettingsChanged,
    WorkLog,
    code_version,
    fingerprint,
)
from pfi_rag.cli import app
from pfi_rag.config import load_config
from pfi_rag.layout import bench_dir


def _run(scenario: str, seed: int, value: float, seconds: float) -> dict:
    planted = scenario != "clean"
    return {
        "scenario": scenario,
        "seed": seed,
        "planted_clients": [TARGET] if planted else [],
        "planted": {},
        "system": {"mean_loss_start": 3.0, "mean_loss_end": 2.0, "failures": 0, "seconds": seconds / 2},
        "probes": {
            "update_outliers": {
                "verdict": "fail" if value > 3.5 else "pass",
                "value": value,
                "metric": "outlier_updates",
                "fails_above": True,
                "threshold": 3.5,
                "flagged_clients": [TARGET] if value > 3.5 else [],
                "seconds": 0.1,
            }
        },
        "seconds": seconds,
    }


def _three_of_four_runs_logged(runner, base: list[str], out: list[str], work: Path, command: str) -> WorkLog:
    """Settings recorded by an invocation that ran nothing, then three of the four runs of
    poisoned_client x 2 seeds logged as finished (poisoned_client seed 1 missing)."""
    assert runner.invoke(app, [*base, "--no-matrix", "--no-tradeoff", *out]).exit_code == 0
    key = json.loads((work / SETTINGS_FILE).read_text())["fingerprint"]
    log = WorkLog.open(work, key, describe={"preset": "quick", "world": "synthetic"}, command=command)
    log.record(_run("clean", 0, 1.0, seconds=100.0))
    log.record(_run("poisoned_client", 0, 9.0, seconds=50.0))
    log.record(_run("clean", 1, 1.5, seconds=100.0))
    return log


def _fingerprint(tmp_path, **changes) -> str:
    cfg = load_config(None, {"data_root": str(tmp_path), **PRESETS["quick"].overrides(), **changes})
    return fingerprint(cfg, preset="quick", world="synthetic", probes=("update_outliers",), probe_rounds=True)


def test_code_version_follows_the_package_source(tmp_path, monkeypatch):
    from pfi_rag.benchmark import worklog

    now = code_version()
    assert len(now) == 12 and code_version() == now
    # The same hash over a copy of the package, then with one source file changed.
    package = Path(worklog.__file__).resolve().parents[1]
    copy = tmp_path / "pfi_rag"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(worklog, "__file__", str(copy / "benchmark" / "worklog.py"))
    assert code_version() == now
    (copy / "config.py").write_text((copy / "config.py").read_text() + "\n# changed\n")
    assert code_version() != now


def test_fingerprint_follows_settings_not_paths(tmp_path):
    same = _fingerprint(tmp_path)

    assert _fingerprint(tmp_path / "elsewhere", **{"models.cache_dir": str(tmp_path / "cache")}) == same
    assert _fingerprint(tmp_path, **{"privacy.local_steps": 4}) != same
    cfg = load_config(None, {"data_root": str(tmp_path), **PRESETS["quick"].overrides()})
    other_probes = fingerprint(cfg, preset="quick", world="synthetic", probes=("bias",), probe_rounds=True)
    assert other_probes != same


def test_work_log_keeps_finished_runs_and_drops_a_cut_line(tmp_path):
    work = tmp_path / "work"
    first = WorkLog.open(work, "aaaa", describe={"preset": "quick", "world": "synthetic"}, command="one")
    first.record(_run("clean", 0, 1.0, seconds=10.0))
    first.record(_run("clean", 1, 1.0, seconds=12.0))
    first.finish(ran=2, reused=0, seconds=25.0)
    with (work / RUNS_FILE).open("a") as handle:
        handle.write('{"scenario": "poisoned_client", "seed": 0, "sec')  # killed mid-write

    second = WorkLog.open(work, "aaaa", describe={"preset": "quick", "world": "synthetic"}, command="two")
    second.record(_run("clean", 1, 2.0, seconds=14.0))  # the same run again: the last line counts

    finished = second.finished_runs()
    assert sorted(finished) == [("clean", 0), ("clean", 1)]
    assert finished[("clean", 1)]["seconds"] == 14.0
    assert {run["code"] for run in finished.values()} == {code_version()}
    assert all(json.loads(line) for line in (work / RUNS_FILE).read_text().splitlines())  # no cut line
    settings = json.loads((work / SETTINGS_FILE).read_text())
    assert [i["command"] for i in settings["invocations"]] == ["one", "two"]
    assert {i["code"] for i in settings["invocations"]} == {code_version()}
    assert settings["invocations"][0] | {"ran": 2, "reused": 0} == settings["invocations"][0]

    with pytest.raises(SettingsChanged, match="--fresh"):
        WorkLog.open(work, "bbbb", describe={"preset": "full", "world": "synthetic"}, command="three")
    assert len(WorkLog.open(work, "bbbb", describe={}, command="four", fresh=True).finished_runs()) == 0


def test_cli_reuses_finished_runs_refuses_other_settings_and_starts_fresh(cli_workdir):
    runner = CliRunner()
    base = ["--data-root", str(cli_workdir / "data"), "bench", "silent-failures", "--preset", "quick"]
    out = ["--out", str(cli_workdir / "results")]
    matrix = [*base, "--scenarios", "poisoned_client", "--seeds", "2", "--no-tradeoff", *out]
    work = bench_dir(cli_workdir / "data")
    # Prepare: an invocation that runs nothing records the settings; then two seeds of finished
    # runs, as two earlier invocations would have logged them.
    nothing = runner.invoke(app, [*base, "--no-matrix", "--no-tradeoff", *out])
    assert nothing.exit_code == 0, nothing.output
    key = json.loads((work / SETTINGS_FILE).read_text())["fingerprint"]
    log = WorkLog.open(work, key, describe={"preset": "quick", "world": "synthetic"}, command="earlier")
    for seed, (clean, poisoned) in enumerate([(1.0, 9.0), (1.5, 8.0)]):
        log.record(_run("clean", seed, clean, seconds=100.0))
        log.record(_run("poisoned_client", seed, poisoned, seconds=50.0))
    log.finish(ran=4, reused=0, seconds=300.0)

    reused = runner.invoke(app, matrix)

    assert reused.exit_code == 0, reused.output
    assert "reusing 4 of 4 runs" in reused.output
    saved = json.loads((cli_workdir / "results" / "silent-failures.json").read_text())
    assert saved["meta"]["invocations"] == 3 and saved["meta"]["reused"] == 4
    assert saved["meta"]["run_seconds"] == 300.0  # 2 x 100 + 2 x 50, whichever invocation ran them
    assert saved["meta"]["code_versions"] == [code_version()]  # which code made the runs, never hidden
    row = saved["scores"]["poisoned_client"]["probes"]["update_outliers"]
    assert row["tpr"] == 1.0 and row["fpr"] == 0.0 and row["tpr_of"] == [2, 2]
    report = (cli_workdir / "results" / "silent-failures.md").read_text()
    assert "3 invocations" in report and f"1 version(s) of pfi-rag's code ({code_version()})" in report

    changed = runner.invoke(app, [*matrix, "--no-round-references"])
    assert changed.exit_code == 2 and "--fresh" in changed.output
    assert len(log.finished_runs()) == 4  # refused, nothing lost

    fresh = runner.invoke(app, [*base, "--no-matrix", "--no-tradeoff", "--fresh", *out])
    assert fresh.exit_code == 0, fresh.output
    assert not (work / RUNS_FILE).exists()


def test_report_only_tables_the_finished_runs_and_changes_nothing(cli_workdir):
    runner = CliRunner()
    base = ["--data-root", str(cli_workdir / "data"), "bench", "silent-failures", "--preset", "quick"]
    out = ["--out", str(cli_workdir / "results")]
    report = [*base, "--scenarios", "poisoned_client", "--seeds", "2", "--no-tradeoff", "--report-only", *out]
    work = bench_dir(cli_workdir / "data")
    nothing_yet = runner.invoke(app, report)
    assert nothing_yet.exit_code == 2 and "run the benchmark first" in nothing_yet.output
    # Prepare: settings recorded, and three of the four runs finished (poisoned seed 1 missing).
    _three_of_four_runs_logged(runner, base, out, work, command="running")
    before = {name: (work / name).read_bytes() for name in (SETTINGS_FILE, RUNS_FILE)}

    reported = runner.invoke(app, report)

    assert reported.exit_code == 0, reported.output
    assert "reporting on 3 of 4 runs" in reported.output
    assert {name: (work / name).read_bytes() for name in before} == before  # only read
    saved = json.loads((cli_workdir / "results" / "silent-failures.json").read_text())
    assert saved["meta"]["report_only"] and saved["meta"]["missing"] == {
        "runs": {"poisoned_client": [1]},
        "tradeoff": [],
    }
    row = saved["scores"]["poisoned_client"]["probes"]["update_outliers"]
    assert row["tpr_of"] == [1, 1] and row["fpr_of"] == [0, 2]
    table = (cli_workdir / "results" / "silent-failures.md").read_text()
    assert "Partial report" in table and "Not finished: poisoned_client seed 1." in table

    other = runner.invoke(app, [*report, "--no-round-references"])
    assert other.exit_code == 2 and "options they were run with" in other.output
    both = runner.invoke(app, [*report, "--fresh"])
    assert both.exit_code == 2 and (work / RUNS_FILE).read_bytes() == before[RUNS_FILE]


def test_planted_runs_can_run_only_their_intended_and_record_probes():
    from pfi_rag.benchmark.runs import PROBES, probes_for
    from pfi_rag.benchmark.scenarios import scenario_named

    overfit = scenario_named("overfit_client")

    assert probes_for(overfit, PROBES, "all") == PROBES
    assert probes_for(scenario_named("clean"), PROBES, "intended") == PROBES  # false alarms need all
    chosen = probes_for(overfit, PROBES, "intended")
    assert {"membership", "calibration", "ood", "update_outliers", "budget"} <= set(chosen)
    assert not {"bias", "refusal", "exposure", "leakage"} & set(chosen)


def test_finished_trade_off_runs_are_reused_and_counted(tmp_path):
    from dataclasses import replace

    from pfi_rag.benchmark.silent_failures import run_benchmark

    # Prepare: the non-private trade-off row of an earlier invocation with the same settings.
    preset = replace(PRESETS["quick"], tradeoff_epsilons=(None,))
    cfg = load_config(None, {"data_root": str(tmp_path), **preset.overrides()})
    key = fingerprint(cfg, preset="quick", world="synthetic", probes=("update_outliers",), probe_rounds=True)
    log = WorkLog.open(
        tmp_path / "work", key, describe={"preset": "quick", "world": "synthetic"}, command="x"
    )
    cell = {"answer_ppl": 4.9, "accuracy": 0.95}
    log.record(
        {"epsilon": None, "system": {"seconds": 0.0}, "mean": {"base": cell}, "measure_seconds": 30.0},
        kind="tradeoff",
    )
    events = []

    # Execute: a trade-off-only invocation (nothing left to run, so nothing loads a model).
    result = run_benchmark(
        cfg,
        preset=preset,
        out=tmp_path / "out",
        work=tmp_path / "work",
        matrix=False,
        probes=("update_outliers",),
        on_event=events.append,
    )

    # Assert
    assert "reusing 0 of 0 runs and 1 of 1 trade-off runs" in events[0]
    assert result["tradeoff"][0]["mean"]["base"] == cell
    assert result["meta"]["run_seconds"] == 30.0 and result["meta"]["invocations"] == 2
    assert "| non-private | 4.9 / 0.95 |" in (tmp_path / "out" / "silent-failures.md").read_text()


def test_a_run_whose_federation_fails_is_left_for_the_next_invocation(cli_workdir, monkeypatch):
    from pfi_rag.benchmark import silent_failures
    from pfi_rag.federation.server import FederationFailed

    runner = CliRunner()
    base = ["--data-root", str(cli_workdir / "data"), "bench", "silent-failures", "--preset", "quick"]
    out = ["--out", str(cli_workdir / "results")]
    matrix = [*base, "--scenarios", "poisoned_client", "--seeds", "2", "--no-tradeoff", *out]
    work = bench_dir(cli_workdir / "data")
    # Prepare: three of the four runs finished earlier; the fourth's federation will fail, as
    # Flower fails a run whose task missed its heartbeats. (run_one stands in for the real run
    # here so that the failure is certain; tests/test_benchmark.py runs real federations.)
    log = _three_of_four_runs_logged(runner, base, out, work, command="earlier")

    def lost(*args, **kwargs):
        raise FederationFailed("the Flower run ended finished:failed: No heartbeat received from the task")

    monkeypatch.setattr(silent_failures, "run_one", lost)

    failed = runner.invoke(app, matrix)

    assert failed.exit_code == 1
    assert "failed: poisoned_client seed 1: " in failed.output and "No heartbeat" in failed.output
    assert "run the same command again" in failed.output
    saved = json.loads((cli_workdir / "results" / "silent-failures.json").read_text())
    assert saved["meta"]["missing"] == {"runs": {"poisoned_client": [1]}, "tradeoff": []}
    assert [(r["scenario"], r["seed"]) for r in saved["meta"]["failed_runs"]] == [("poisoned_client", 1)]
    assert saved["scores"]["poisoned_client"]["probes"]["update_outliers"]["tpr_of"] == [1, 1]
    table = (cli_workdir / "results" / "silent-failures.md").read_text()
    assert "Partial report** (their federations failed" in table
    assert ("poisoned_client", 1) not in log.finished_runs()

    # The same command again runs only the lost run.
    monkeypatch.setattr(
        silent_failures, "run_one", lambda *a, seed, **k: _run("poisoned_client", seed, 8.0, 50.0)
    )
    again = runner.invoke(app, matrix)

    assert again.exit_code == 0, again.output
    assert "reusing 3 of 4 runs" in again.output
    row = json.loads((cli_workdir / "results" / "silent-failures.json").read_text())["scores"][
        "poisoned_client"
    ]
    assert row["probes"]["update_outliers"]["tpr_of"] == [2, 2]
