"""The benchmark's statistics: Wilson intervals, the detection goal, calibration on every
healthy round, the report's tables, and the --gpu refusal. (The healthy reports a real run
leaves for `pfi-rag calibrate-probes`: the real-text test in test_benchmark.py.)"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pfi_rag.benchmark.report import MARKDOWN_FILE, write_outputs
from pfi_rag.benchmark.scenarios import TARGET, scenario_named
from pfi_rag.benchmark.scoring import calibration_summary, score
from pfi_rag.benchmark.stats import goal_verdict, runs_to_establish, wilson
from pfi_rag.cli import app


def test_wilson_interval_matches_published_values():
    # Hand-worked from (k + z²/2)/(n + z²) ± z/(n + z²)·sqrt(k(n-k)/n + z²/4), z = 1.95996:
    # 0/5 -> [0, z²/(5 + z²)] = [0, 0.4345]; 5/5 is its mirror; 3/10 -> [0.1078, 0.6032]
    # (Newcombe 1998's method 3; Brown, Cai & DasGupta 2001).
    assert wilson(0, 5) == (0.0, pytest.approx(0.43448, abs=1e-5))
    assert wilson(5, 5) == (pytest.approx(0.56552, abs=1e-5), 1.0)
    assert wilson(3, 10) == (pytest.approx(0.10779, abs=1e-5), pytest.approx(0.60322, abs=1e-5))
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson(3, 2)
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_wilson_interval_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 1), (1, 2), (2, 7), (0, 35), (19, 20), (35, 35)]:
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson(k, n)
        assert low == pytest.approx(expected.low, abs=1e-12)
        assert high == pytest.approx(expected.high, abs=1e-12)


def test_thirty_five_clean_runs_a_side_establish_the_goal():
    assert runs_to_establish() == 35
    assert wilson(35, 35)[0] >= 0.9 > wilson(34, 34)[0]
    assert wilson(0, 35)[1] <= 0.1 < wilson(0, 34)[1]


@pytest.mark.parametrize(
    ("tpr", "fpr", "n", "auc", "status"),
    [
        (1.0, 0.0, 35, 1.0, "established"),
        (1.0, 0.0, 5, 1.0, "met, not established"),  # 5/5 is only >= 0.57 at 95%
        (0.2, 0.0, 5, 1.0, "separates, threshold misses"),
        (0.4, 0.4, 5, 0.5, "at chance"),
        (0.6, 0.2, 5, 0.75, "weak"),
    ],
)
def test_goal_verdict_says_why_from_the_numbers(tpr, fpr, n, auc, status):
    verdict = goal_verdict(
        tpr=tpr,
        tpr_ci=list(wilson(round(tpr * n), n)),
        fpr=fpr,
        fpr_ci=list(wilson(round(fpr * n), n)),
        auroc=auc,
        failed_runs=n,
        clean_runs=n,
    )
    assert verdict.status == status
    if status == "met, not established":
        assert "more seeds" in verdict.why and "35" in verdict.why
    if status == "separates, threshold misses":
        hinted = goal_verdict(
            tpr=tpr,
            tpr_ci=[0.04, 0.6],
            fpr=fpr,
            fpr_ci=[0.0, 0.4],
            auroc=auc,
            failed_runs=n,
            clean_runs=n,
            reference_runs=4,
        )
        assert "4 clean runs per seed bound false alarms by 1/5" in hinted.why
        assert "9 runs bound them by 0.1" in hinted.why
    assert (
        goal_verdict(
            tpr=None, tpr_ci=None, fpr=0.0, fpr_ci=[0, 0.4], auroc=None, failed_runs=0, clean_runs=5
        ).status
        == "unknown"
    )


def _entry(value: float, verdict: str = "pass") -> dict:
    return {
        "verdict": verdict,
        "value": value,
        "metric": "gap_increase",  # what bias reads: calibration leaves out references on another metric
        "threshold": 0.5,
        "fails_above": True,
        "flagged_clients": [TARGET] if verdict == "fail" else [],
    }


def _run(scenario: str, seed: int, value: float, rounds: tuple[float, ...] = ()) -> dict:
    run = {
        "scenario": scenario,
        "seed": seed,
        "planted_clients": [] if scenario == "clean" else [TARGET],
        "system": {"mean_loss_end": 2.0, "failures": 0},
        "probes": {"bias": _entry(value, "fail" if value > 0.5 else "pass")},
    }
    if rounds:
        run["round_probes"] = [{"round": i + 1, "probes": {"bias": _entry(v)}} for i, v in enumerate(rounds)]
    return run


def test_calibration_draws_on_every_healthy_round_of_the_other_seeds(tmp_path):
    # Clean finals 0.10 / 0.20 (earlier rounds 0.30 / 0.05); biased 0.25 and 0.15.
    runs = [
        _run("clean", 0, 0.10, rounds=(0.30,)),
        _run("clean", 1, 0.20, rounds=(0.05,)),
        _run("biased_client", 0, 0.25),
        _run("biased_client", 1, 0.15),
    ]

    scores = score(runs, [scenario_named("clean"), scenario_named("biased_client")])

    row = scores["biased_client"]
    assert row["references_per_seed"] == {0: 2, 1: 2}  # the other seed's round 1 and final state
    assert row["reference_runs_per_seed"] == {0: 1, 1: 1}  # ... both from one run
    cell = row["probes"]["bias"]
    # Seed 0 is judged against max(0.05, 0.20) = 0.20: 0.25 fails, 0.10 passes.
    # Seed 1 against max(0.30, 0.10) = 0.30: 0.15 passes, 0.20 passes.
    assert cell["calibrated_tpr"] == 0.5 and cell["calibrated_tpr_of"] == [1, 2]
    assert cell["calibrated_fpr"] == 0.0 and cell["calibrated_fpr_of"] == [0, 2]
    assert cell["calibrated_fpr_ci"] == [0.0, pytest.approx(wilson(0, 2)[1])]
    assert cell["tpr"] == 0.0 and cell["tpr_ci"] == [0.0, pytest.approx(wilson(0, 2)[1])]
    assert cell["auroc"] == 0.75  # 0.25 beats both clean finals, 0.15 beats 0.10 only
    assert row["goal"]["bias"]["thresholds"] == "calibrated"
    assert row["goal"]["bias"]["status"] == "weak"

    result = {
        "meta": {
            "preset": "quick",
            "command": "pfi-rag bench silent-failures",
            "generator": "tiny-random",
            "clients": 4,
            "rounds": 2,
            "seeds": 2,
            "machine": "2 CPUs",
            "versions": {},
            "seconds": 60.0,
        },
        "scores": scores,
        "calibration": calibration_summary(runs),
        "runs": runs,
        "tradeoff": [],
    }
    write_outputs(tmp_path, result)
    table = (tmp_path / MARKDOWN_FILE).read_text()
    assert (
        "| biased_client | bias | 0.00 (0/2) [0.00, 0.66] | 0.00 (0/2) [0.00, 0.66] | 0.75 "
        "| 0.50 (1/2) [0.09, 0.91] | 0.00 (0/2) [0.00, 0.66] | weak |"
    ) in table
    assert "| biased_client (amplified bias) | bias (calibrated) | weak | AUROC 0.75: failed and" in table
    assert "2 reports from 1 runs for seed 0, 2 reports from 1 runs for seed 1" in table
    assert "N counts runs, not reports" in table
    assert "| bias | above | 0.5 | 0.2 | 0.3 |" in table  # each seed's threshold: the others' worst


def test_gpu_option_refuses_clearly_without_cuda(isolated_env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    refused = CliRunner().invoke(app, ["bench", "silent-failures", "--gpu", "--scenarios", "clean"])
    assert refused.exit_code == 2 and "--gpu: torch sees no CUDA device" in refused.output
    assert not (isolated_env / "pfi-data").exists()  # refused before anything was made
