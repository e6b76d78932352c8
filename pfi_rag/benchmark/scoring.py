"""Detection scores of the probes against the planted ground truth.

For each failure and probe: the true positive rate (runs with the failure the probe failed),
the false positive rate (clean runs it failed), and the AUROC of its metric, clean runs against
failed ones, oriented so that 1.0 means the metric always ranks the failed run worse. Beside
them, the federation's own mean training loss, to show whether the failure is silent there.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def auroc(negatives: list[float], positives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U / n m)."""
    if not negatives or not positives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _badness(entry: dict[str, Any]) -> float | None:
    """The probe's value, signed so that larger is worse; None when it skipped or errored."""
    value = entry.get("value")
    if value is None or entry["verdict"] in ("skip", "error") or not math.isfinite(value):
        return None
    return value if entry["fails_above"] else -value


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def calibrated_verdicts(runs: list[dict], clean: list[dict]) -> dict[tuple[str, int], dict[str, bool]]:
    """Per run (by scenario and seed), per probe: does it fail the threshold `pfi-rag calibrate-probes` would
    set from the clean runs of the *other* seeds? (Leave-one-seed-out, so a clean run is never
    its own reference: the FPR is out of sample.)"""
    from pfi_rag.probes.base import Verdict, judge
    from pfi_rag.probes.thresholds import calibrate

    thresholds: dict[int, dict[str, Any]] = {}
    for seed in {r["seed"] for r in runs}:
        references = [
            {"probes": [{"probe": name, **entry} for name, entry in r["probes"].items()]}
            for r in clean
            if r["seed"] != seed
        ]
        thresholds[seed] = {c.probe: c for c in calibrate(references)} if references else {}
    verdicts: dict[tuple[str, int], dict[str, bool]] = {}
    for run in runs:
        verdicts[run_key(run)] = judged = {}
        for name, entry in run["probes"].items():
            chosen = thresholds[run["seed"]].get(name)
            value = entry.get("value")
            if chosen is None or value is None or entry["verdict"] not in ("pass", "fail"):
                continue
            verdict = judge(float(value), chosen.threshold, fails_above=chosen.fails_above)
            judged[name] = verdict == Verdict.FAIL
    return verdicts


def run_key(run: dict[str, Any]) -> tuple[str, int]:
    return run["scenario"], run["seed"]


def score(runs: list[dict[str, Any]], scenarios) -> dict[str, Any]:
    """Per scenario: per probe TPR, FPR (against the clean runs) and AUROC, with the configured
    and with calibrated thresholds; and the system view."""
    clean = [r for r in runs if r["scenario"] == "clean"]
    calibrated = calibrated_verdicts(runs, clean)

    def calibrated_rate(group: list[dict[str, Any]], name: str) -> float | None:
        failed = [calibrated[run_key(r)].get(name) for r in group]
        return _rate([f for f in failed if f is not None])

    probes = sorted({name for r in runs for name in r["probes"]})
    clean_loss = [r["system"]["mean_loss_end"] for r in clean if r["system"]["mean_loss_end"] is not None]
    table: dict[str, Any] = {}
    for scenario in scenarios:
        if scenario.name == "clean":
            continue
        failed = [r for r in runs if r["scenario"] == scenario.name]
        if not failed:
            continue
        per_probe = {}
        for name in probes:
            neg = [_badness(r["probes"][name]) for r in clean if name in r["probes"]]
            pos = [_badness(r["probes"][name]) for r in failed if name in r["probes"]]
            per_probe[name] = {
                "tpr": _rate([r["probes"][name]["verdict"] == "fail" for r in failed if name in r["probes"]]),
                "fpr": _rate([r["probes"][name]["verdict"] == "fail" for r in clean if name in r["probes"]]),
                "auroc": auroc([v for v in neg if v is not None], [v for v in pos if v is not None]),
                "calibrated_tpr": calibrated_rate(failed, name),
                "calibrated_fpr": calibrated_rate(clean, name),
                # Did the probe name the client that carries the failure?
                "localised": _rate(
                    [
                        bool(set(r["probes"][name]["flagged_clients"]) & set(r["planted_clients"]))
                        for r in failed
                        if name in r["probes"] and r["probes"][name]["verdict"] == "fail"
                    ]
                ),
            }
        losses = [r["system"]["mean_loss_end"] for r in failed if r["system"]["mean_loss_end"] is not None]
        caught = [p for p in scenario.detectors if (per_probe.get(p, {}).get("tpr") or 0) > 0]
        table[scenario.name] = {
            "failure": scenario.failure,
            "detectors": list(scenario.detectors),
            "runs": len(failed),
            "probes": per_probe,
            "detector_tpr": max(
                (per_probe[p]["tpr"] or 0 for p in scenario.detectors if p in per_probe), default=0
            ),
            "caught_by": caught,
            "system": system_view(clean_loss, losses, failed),
        }
    return table


def system_view(clean_loss: list[float], failed_loss: list[float], failed: list[dict]) -> dict[str, Any]:
    """What a plain federation shows: mean end loss against the clean runs', and failed results.

    ``visible`` is True when a round reported failed results, or the failed runs' mean loss
    differs from the clean runs' mean by more than both the clean runs' own range (seed to seed)
    and 5% (what an operator watching a loss curve would plausibly notice); otherwise the
    failure is silent to the federation's own metrics.
    """
    if not clean_loss or not failed_loss:
        return {"clean_mean_loss": None, "failed_mean_loss": None, "visible": None}
    centre = statistics.fmean(clean_loss)
    change = statistics.fmean(failed_loss) - centre
    errors = sum(r["system"]["failures"] for r in failed)
    noticeable = abs(change) > max(max(clean_loss) - min(clean_loss), 0.05 * abs(centre))
    return {
        "clean_mean_loss": centre,
        "failed_mean_loss": centre + change,
        "loss_change": change,
        "failed_results": errors,
        "visible": bool(noticeable or errors),
    }
