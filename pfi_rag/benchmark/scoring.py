"""Detection scores of the probes against the planted ground truth.

For each failure and probe: the true positive rate (runs with the failure the probe failed),
the false positive rate (clean runs it failed), each with its Wilson 95% interval
(:mod:`.stats`), and the AUROC of its metric, clean runs against failed ones, oriented so that
1.0 means the metric always ranks the failed run worse. The rates are counted twice: at the
configured thresholds and at thresholds calibrated leave-one-seed-out on the healthy reports of
the other seeds. Beside them, the federation's own mean training loss, to show whether the
failure is silent there, and whether each intended probe reaches the detection goal.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from pfi_rag.benchmark.stats import goal_verdict, rate_with_interval
from pfi_rag.probes.metrics import roc_auc


def auroc(negatives: list[float], positives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U / n m)."""
    if not negatives or not positives:
        return None
    return roc_auc(positives, negatives)


def _badness(entry: dict[str, Any]) -> float | None:
    """The probe's value, signed so that larger is worse; None when it skipped or errored."""
    value = entry.get("value")
    if value is None or entry["verdict"] in ("skip", "error") or not math.isfinite(value):
        return None
    return value if entry["fails_above"] else -value


def healthy_reports(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A clean run's probe results as ``report.json``-shaped dicts: one per round it was probed
    after (``round_probes``, earlier rounds) and its final state."""
    states = [*(r["probes"] for r in run.get("round_probes", [])), run["probes"]]
    return [{"probes": [{"probe": name, **entry} for name, entry in probes.items()]} for probes in states]


def thresholds_by_seed(runs: list[dict]) -> dict[int, dict[str, Any]]:
    """Per seed: the thresholds `pfi-rag calibrate-probes` would set from the healthy reports
    (every round) of the clean runs of the *other* seeds, by probe (leave-one-seed-out), how
    many reports they came from, and from how many runs.

    The runs, not the reports, bound the false alarms: a run's earlier rounds are correlated
    with its final state, not exchangeable with a new run's, so what holds is that a healthy
    final state is worse than the other runs' final states with probability at most
    1/(runs + 1); the earlier rounds can only raise the threshold further."""
    from pfi_rag.probes.thresholds import calibrate

    clean = [r for r in runs if r["scenario"] == "clean"]
    by_seed: dict[int, dict[str, Any]] = {}
    for seed in sorted({r["seed"] for r in runs}):
        others = [r for r in clean if r["seed"] != seed]
        references = [report for r in others for report in healthy_reports(r)]
        chosen = {c.probe: c for c in calibrate(references)} if references else {}
        by_seed[seed] = {"references": len(references), "runs": len(others), "thresholds": chosen}
    return by_seed


def calibration_summary(runs: list[dict]) -> dict[int, dict[str, Any]]:
    """:func:`thresholds_by_seed`, JSON-ready: per seed the reference count and each threshold."""
    return {
        seed: {
            "references": entry["references"],
            "runs": entry["runs"],
            "thresholds": {
                name: {"threshold": c.threshold, "configured": c.configured, "fails_above": c.fails_above}
                for name, c in entry["thresholds"].items()
            },
        }
        for seed, entry in thresholds_by_seed(runs).items()
    }


def calibrated_verdicts(runs: list[dict]) -> dict[tuple[str, int], dict[str, bool]]:
    """Per run (by scenario and seed), per probe: does it fail its seed's calibrated threshold
    (:func:`thresholds_by_seed`)? Leave-one-seed-out, so a clean run is never its own
    reference: the FPR is out of sample."""
    from pfi_rag.probes.base import Verdict, judge

    thresholds = thresholds_by_seed(runs)
    verdicts: dict[tuple[str, int], dict[str, bool]] = {}
    for run in runs:
        verdicts[run_key(run)] = judged = {}
        for name, entry in run["probes"].items():
            chosen = thresholds[run["seed"]]["thresholds"].get(name)
            value = entry.get("value")
            if chosen is None or value is None or entry["verdict"] not in ("pass", "fail"):
                continue
            verdict = judge(float(value), chosen.threshold, fails_above=chosen.fails_above)
            judged[name] = verdict == Verdict.FAIL
    return verdicts


def run_key(run: dict[str, Any]) -> tuple[str, int]:
    return run["scenario"], run["seed"]


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _rates(prefix: str, flags: list[bool]) -> dict[str, Any]:
    """``prefix`` (the share of True), ``prefix_ci`` (Wilson 95%) and ``prefix_of`` ([k, n])."""
    value, interval, counts = rate_with_interval(flags)
    return {prefix: value, f"{prefix}_ci": interval, f"{prefix}_of": counts}


def score(runs: list[dict[str, Any]], scenarios) -> dict[str, Any]:
    """Per scenario: per probe TPR, FPR (against the clean runs), their 95% intervals and AUROC,
    with the configured and with calibrated thresholds; the goal verdict of each intended probe;
    and the system view."""
    clean = [r for r in runs if r["scenario"] == "clean"]
    calibrated = calibrated_verdicts(runs)
    by_seed = thresholds_by_seed(runs)
    references = {seed: e["references"] for seed, e in by_seed.items()}
    reference_runs = {seed: e["runs"] for seed, e in by_seed.items()}

    def calibrated_flags(group: list[dict[str, Any]], name: str) -> list[bool]:
        failed = [calibrated[run_key(r)].get(name) for r in group]
        return [f for f in failed if f is not None]

    def configured_flags(group: list[dict[str, Any]], name: str) -> list[bool]:
        return [r["probes"][name]["verdict"] == "fail" for r in group if name in r["probes"]]

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
                **_rates("tpr", configured_flags(failed, name)),
                **_rates("fpr", configured_flags(clean, name)),
                "auroc": auroc([v for v in neg if v is not None], [v for v in pos if v is not None]),
                **_rates("calibrated_tpr", calibrated_flags(failed, name)),
                **_rates("calibrated_fpr", calibrated_flags(clean, name)),
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
            "clean_runs": len(clean),
            "references_per_seed": references,  # healthy reports each seed's thresholds came from
            "reference_runs_per_seed": reference_runs,  # ... and the clean runs that made them
            "probes": per_probe,
            "detector_tpr": max(
                (per_probe[p]["tpr"] or 0 for p in scenario.detectors if p in per_probe), default=0
            ),
            "caught_by": caught,
            "goal": {
                p: goal(per_probe[p], reference_runs=min(reference_runs.values(), default=0))
                for p in scenario.detectors
                if p in per_probe
            },
            "system": system_view(clean_loss, losses, failed),
        }
    return table


def goal(row: dict[str, Any], *, reference_runs: int) -> dict[str, Any]:
    """The goal (TPR >= 0.9 at FPR <= 0.1) judged at the calibrated thresholds, the benchmark's
    protocol; at the configured ones where nothing could be calibrated (a single seed)."""
    kind = "calibrated" if row["calibrated_tpr"] is not None and row["calibrated_fpr"] is not None else ""
    prefix = f"{kind}_" if kind else ""
    verdict = goal_verdict(
        tpr=row[f"{prefix}tpr"],
        tpr_ci=row[f"{prefix}tpr_ci"],
        fpr=row[f"{prefix}fpr"],
        fpr_ci=row[f"{prefix}fpr_ci"],
        auroc=row["auroc"],
        failed_runs=row[f"{prefix}tpr_of"][1],
        clean_runs=row[f"{prefix}fpr_of"][1],
        reference_runs=reference_runs if kind else None,
    )
    return {"thresholds": kind or "configured", "status": verdict.status, "why": verdict.why}


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
