"""`pfi-rag demo --quick` end to end on the tiny model: real FAISS, Flower, Opacus, HTTP server, probes.

One full run (minutes on a loaded 2-core machine: Ray's start and the probe suite dominate), read
back from what it leaves on disk; the data-root safety rules are checked on their own, cheaply.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pfi_rag.cli.end_to_end import ASKED, DEMO_MARKER, DemoError, demo_lock, prepare_root


@pytest.mark.slow
def test_quick_demo_answers_two_clients_from_their_own_adapters_and_documents(isolated_env, model_cache):
    # Prepare: the quick settings (1 round, 2 DP steps) on the tiny model, 4 new tokens per answer.
    data_root = isolated_env / "pfi-data"
    args = ["--data-root", str(data_root), "--set", "models.generator=tiny-random"]
    args += ["--set", f"models.cache_dir={model_cache}", "--set", "serving.max_new_tokens=4"]

    # Execute: a real process, as `make demo` runs it, so everything printed (Ray workers' output,
    # warnings, Flower's logger) is seen.
    result = subprocess.run(
        [sys.executable, "-m", "pfi_rag", *args, "demo", "--quick"],
        capture_output=True,
        text=True,
        check=False,
    )
    printed = result.stdout + result.stderr

    # Assert: it finished, said where the report is, printed only its own lines, and left every
    # artefact it lists.
    assert result.returncode == 0, printed[-3000:]
    root = data_root / "demo"
    assert "report.html" in result.stdout and "epsilon spent" in result.stdout
    for noise in ("DEBUG", "DeprecationWarning", "FutureWarning", "DEPRECAT", "Warning:", "ClientAppActor"):
        assert noise not in printed, noise
    # Flower's and Ray's output went to the run's log files, relayed to the demo's library log,
    # and the screen says where.
    flower_logs = root / "federation" / "simulation" / "logs"
    assert f"Flower's and Ray's output: {flower_logs}" in result.stdout
    assert "Starting Flower Simulation" in (flower_logs / "run.log").read_text()
    assert "Starting Flower Simulation" in (root / "logs" / "libraries.log").read_text()
    assert (root / DEMO_MARKER).is_file()
    for client in ("client-00", "client-01", "client-02", "client-03"):
        assert (root / "clients" / client / "index" / "faiss.index").is_file()
        assert (root / "clients" / client / "adapter" / "adapter_config.json").is_file()
        ledger = json.loads((root / "clients" / client / "privacy.json").read_text())
        # One round: its DP-SGD steps and its metrics' release.
        assert [s["kind"] for s in ledger["spends"]] == ["dp-sgd", "round-metrics"]
    summary = json.loads((root / "federation" / "summary.json").read_text())
    assert [r["results"] for r in summary["rounds"]] == [4]
    assert all(0 < row["epsilon"] <= 2.0 + 1e-6 for row in summary["clients"].values())
    assert (root / "federation" / "global_adapter" / "adapter_config.json").is_file()
    assert json.loads((root / "keys.json").read_text())["keys"]  # hashes only, one per asking client
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["clients"] == ["client-00", "client-01", "client-02", "client-03"]
    assert (root / "report" / "report.html").stat().st_size > 0

    # The same question, answered as two clients: each with its own adapter and its own documents.
    answers = json.loads((root / "answers.json").read_text())
    assert [a["client_id"] for a in answers] == list(ASKED)
    assert answers[0]["question"] == answers[1]["question"]
    for answer in answers:
        body = answer["body"]
        assert body["adapter"]["kind"] == "client" and body["adapter"]["round"] == 1
        cited_docs = [c["doc_id"] for c in body["citations"]]
        assert cited_docs and all(doc.startswith(answer["client_id"] + "-") for doc in cited_docs)
        assert "flagged" in body["probes"]
    assert answers[0]["expected"] != answers[1]["expected"]  # their documents state different facts


def test_demo_root_is_replaced_whole_and_never_someone_elses(tmp_path: Path):
    # Prepare: a previous demo's root with a file of its run, and a directory the demo did not make.
    previous = prepare_root(tmp_path / "demo")
    (previous / "left-from-last-run.txt").write_text("old")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    # Execute
    replaced = prepare_root(tmp_path / "demo")
    with pytest.raises(DemoError, match="not made by `pfi-rag demo`"):
        prepare_root(foreign)

    # Assert
    assert sorted(p.name for p in replaced.iterdir()) == [DEMO_MARKER]
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_second_demo_on_the_same_data_root_is_refused_while_one_runs(tmp_path: Path):
    with demo_lock(tmp_path):
        with pytest.raises(DemoError, match="another `pfi-rag demo` is running"):
            with demo_lock(tmp_path):
                pass
    with demo_lock(tmp_path):  # released when the first run ends
        pass
