"""The silent-failure benchmark: its scoring arithmetic, and a small matrix end to end on real
Flower runs, FAISS stores and probes (tiny model; the full quick preset is `pfi-rag bench
silent-failures --preset quick`, ~20 min, docs/benchmark.md)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from pfi_rag.benchmark.report import JSON_FILE, MARKDOWN_FILE
from pfi_rag.benchmark.scenarios import TARGET, scenario_named
from pfi_rag.benchmark.scoring import auroc, score, system_view
from pfi_rag.benchmark.silent_failures import PRESETS, REFERENCES_DIR, run_benchmark
from pfi_rag.cli import app
from pfi_rag.config import load_config
from pfi_rag.models.adapters import global_adapter_dir, read_adapter_info
from pfi_rag.privacy import PrivacyLedger


def test_auroc_counts_wins_and_half_ties():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auroc([1.0], [1.0]) == 0.5
    assert auroc([0.0, 2.0], [1.0]) == 0.5
    assert auroc([], [1.0]) is None


def _run(scenario: str, seed: int, value: float, verdict: str, loss: float, flagged=()) -> dict:
    return {
        "scenario": scenario,
        "seed": seed,
        "planted_clients": [] if scenario == "clean" else [TARGET],
        "system": {"mean_loss_end": loss, "failures": 0},
        "probes": {
            "update_outliers": {
                "verdict": verdict,
                "value": value,
                "metric": "outlier_updates",
                "threshold": 0.0,
                "fails_above": True,
                "flagged_clients": list(flagged),
            }
        },
    }


def test_score_gives_tpr_fpr_auroc_and_whether_the_federation_saw_it():
    runs = [
        _run("clean", 0, 0.0, "pass", 2.00),
        _run("clean", 1, 1.0, "fail", 2.02),
        _run("poisoned_client", 0, 2.0, "fail", 2.01, flagged=[TARGET]),
        _run("poisoned_client", 1, 0.0, "pass", 2.01),
    ]
    scores = score(runs, [scenario_named("clean"), scenario_named("poisoned_client")])
    row = scores["poisoned_client"]["probes"]["update_outliers"]
    assert row["tpr"] == 0.5 and row["fpr"] == 0.5
    assert row["auroc"] == (1 + 1 + 0.5 + 0) / 4  # 2>0, 2>1; 0=0 (half), 0<1
    assert row["localised"] == 1.0
    # Calibrated on the other seed's clean run: seed 0 is judged against 1.0, seed 1 against 0.0.
    assert row["calibrated_tpr"] == 0.5 and row["calibrated_fpr"] == 0.5  # 2 > 1 fails; 1 > 0 fails
    # A loss inside the clean runs' range: silent to the federation.
    assert scores["poisoned_client"]["system"]["visible"] is False
    assert system_view([2.0, 2.02], [2.5], [{"system": {"failures": 0}}])["visible"] is True
    assert system_view([2.0, 2.02], [2.01], [{"system": {"failures": 1}}])["visible"] is True


@pytest.mark.slow  # real Flower runs of three scenarios: minutes
def test_a_small_matrix_on_flower_finds_what_was_planted(isolated_env, tmp_path, model_cache):
    """Clean, poisoned and stale runs through the real pipeline; the poisoned update and the
    stale index are found, named, and absent from the clean run. The non-private trade-off
    baseline runs in-process (an un-noised update may not leave a client) and trains adapters."""
    preset = replace(PRESETS["quick"], seeds=1, tradeoff_epsilons=(None,))
    cfg = load_config(
        None,
        {"data_root": str(tmp_path / "data"), "models.cache_dir": str(model_cache), **preset.overrides()},
    )
    scenarios = tuple(scenario_named(n) for n in ("clean", "poisoned_client", "stale_index"))
    out = tmp_path / "results"
    result = run_benchmark(
        cfg,
        preset=preset,
        out=out,
        work=tmp_path / "work",
        scenarios=scenarios,
        probes=("update_outliers", "stale", "silent_failures"),
    )

    poisoned = result["scores"]["poisoned_client"]["probes"]["update_outliers"]
    assert poisoned["tpr"] == 1.0 and poisoned["fpr"] == 0.0 and poisoned["localised"] == 1.0
    stale = result["scores"]["stale_index"]["probes"]["stale"]
    assert stale["tpr"] == 1.0 and stale["fpr"] == 0.0 and stale["localised"] == 1.0
    assert result["scores"]["poisoned_client"]["caught_by"] == ["update_outliers"]
    clean = next(r for r in result["runs"] if r["scenario"] == "clean")
    verdicts = {name: v["verdict"] for name, v in clean["probes"].items()}
    assert set(verdicts.values()) == {"pass"}, clean["probes"]
    assert clean["system"]["failures"] == 0 and math.isfinite(clean["system"]["mean_loss_end"])

    # The poisoning mod changed only what the target client sent: its own ledger is honest.
    poisoned_run = next(r for r in result["runs"] if r["scenario"] == "poisoned_client")
    assert 0 < poisoned_run["system"]["epsilon"][TARGET] <= cfg.privacy.epsilon_max + 1e-6

    (row,) = result["tradeoff"]
    assert row["epsilon"] is None and row["system"]["in_process"]
    baseline = tmp_path / "work" / "tradeoff-non-private"
    assert read_adapter_info(global_adapter_dir(baseline)).source == "non-private baseline"
    assert PrivacyLedger.open(baseline, "client-00", cfg.privacy).spends == []  # nothing was charged
    assert {"base", "global", "personalized + retrieval"} <= set(row["mean"])
    assert row["system"]["mean_loss_end"] < row["system"]["mean_loss_start"]  # it trained
    for cell in row["mean"].values():
        assert 0.0 <= cell["accuracy"] <= 1.0 and cell["answer_ppl"] > 1.0

    saved = json.loads((out / JSON_FILE).read_text())
    assert saved["meta"]["versions"]["opacus"] == "1.6.0" and saved["meta"]["seeds"] == 1
    table = (out / MARKDOWN_FILE).read_text()
    assert "| poisoned_client (poisoned update) | 1 | update_outliers | 1.00 | 0.00 | 1.00 |" in table
    assert (out / "silent-failures-detection.png").stat().st_size > 0
    assert (out / "silent-failures-tradeoff.png").stat().st_size > 0


def test_cli_refuses_an_unknown_preset_or_scenario(isolated_env):
    runner = CliRunner()
    bad_preset = runner.invoke(app, ["bench", "silent-failures", "--preset", "huge"])
    assert bad_preset.exit_code == 2 and "unknown preset 'huge'" in bad_preset.output
    bad_scenario = runner.invoke(app, ["bench", "silent-failures", "--scenarios", "clean,nope"])
    assert bad_scenario.exit_code == 2 and "no scenario 'nope'" in bad_scenario.output
    assert not (isolated_env / "pfi-data").exists()  # refused before anything was made


@pytest.mark.slow  # two real Flower runs on clients ingested from chatterbot-corpus text: a few minutes
def test_realtext_world_plants_on_ingested_text_and_scores_it(isolated_env, tmp_path, model_cache):
    """Clean and poisoned runs on chatterbot-corpus topics ingested as .txt files (no manifest,
    no synthetic data): the poisoned update is found on the real-text target and scored. The
    clean run leaves a healthy probe report per round (one probed on the server between the
    rounds, one at the end), each on its round's state, that `pfi-rag calibrate-probes` takes."""
    from pfi_rag.benchmark import realtext

    preset = replace(PRESETS["quick"], seeds=1)
    cfg = load_config(
        None,
        {
            "data_root": str(tmp_path / "data"),
            "models.cache_dir": str(model_cache),
            **preset.overrides(),
            **realtext.OVERRIDES,
        },
    )
    scenarios = tuple(scenario_named(n, "realtext") for n in ("clean", "poisoned_client"))
    out = tmp_path / "results"
    result = run_benchmark(
        cfg,
        preset=preset,
        out=out,
        work=tmp_path / "work",
        scenarios=scenarios,
        tradeoff=False,
        probes=("update_outliers", "exposure", "silent_failures"),
        world="realtext",
    )

    root = tmp_path / "work" / "poisoned_client-seed0"
    assert sorted(p.name for p in (root / "clients").iterdir()) == sorted(realtext.TOPICS)
    assert not (root / "manifest.json").exists() and not (root / "shared").exists()
    poisoned = result["scores"]["poisoned_client"]["probes"]["update_outliers"]
    assert poisoned["tpr"] == 1.0 and poisoned["fpr"] == 0.0 and poisoned["localised"] == 1.0
    poisoned_run = next(r for r in result["runs"] if r["scenario"] == "poisoned_client")
    assert poisoned_run["planted_clients"] == [realtext.TARGET]
    assert poisoned_run["probes"]["update_outliers"]["flagged_clients"] == [realtext.TARGET]
    clean = next(r for r in result["runs"] if r["scenario"] == "clean")
    assert clean["probes"]["exposure"]["verdict"] in ("pass", "fail")  # measured on audit canaries
    assert clean["system"]["failures"] == 0 and math.isfinite(clean["system"]["mean_loss_end"])
    assert "realtext world" in (out / MARKDOWN_FILE).read_text()

    reports = sorted((tmp_path / "work" / REFERENCES_DIR).glob("*/report.json"))
    assert [p.parent.name for p in reports] == ["clean-seed0-round0001", "clean-seed0-round0002"]
    assert result["meta"]["references"] == [str(p) for p in reports]
    assert [r["round"] for r in clean["round_probes"]] == [1]
    saved = [{s["probe"]: s for s in json.loads(p.read_text())["probes"]} for p in reports]
    assert [len(r["update_outliers"]["evidence"]["rounds"]) for r in saved] == [1, 2]  # the history so far
    thresholds = tmp_path / "thresholds.toml"
    calibrated = CliRunner().invoke(app, ["calibrate-probes", *map(str, reports), "--out", str(thresholds)])
    assert calibrated.exit_code == 0, calibrated.output
    assert "2 reference report(s)" in thresholds.read_text() and "33%" in calibrated.output


def test_realtext_world_refuses_bad_input_and_names_the_missing_corpus(isolated_env, monkeypatch):
    runner = CliRunner()
    bad_world = runner.invoke(app, ["bench", "silent-failures", "--world", "mars"])
    assert bad_world.exit_code == 2 and "unknown world 'mars'" in bad_world.output
    synthetic_only = runner.invoke(
        app, ["bench", "silent-failures", "--world", "realtext", "--scenarios", "stale_index"]
    )
    assert synthetic_only.exit_code == 2 and "no scenario 'stale_index' in the realtext world" in (
        synthetic_only.output
    )
    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)  # as if it were not installed
    missing = runner.invoke(app, ["bench", "silent-failures", "--world", "realtext"])
    assert missing.exit_code == 2 and "pip install chatterbot-corpus" in missing.output
    assert not (isolated_env / "pfi-data").exists()  # refused before anything was made
