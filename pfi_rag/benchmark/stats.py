"""Interval arithmetic for the benchmark's rates, and the detection goal judged from the numbers.

A rate over a handful of runs (TPR over 5 seeds) is a binomial proportion; its 95% interval is
the Wilson score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over the
normal approximation for small n, and it stays inside [0, 1] at 0/n and n/n, where the normal
one collapses to a point). It is not the exact Clopper-Pearson interval: Wilson's coverage is
close to 95% on average over p, Clopper-Pearson's is at least 95% everywhere and wider.

The goal: a probe detects a planted failure at TPR >= 0.9 with FPR <= 0.1. It is *established*
when the TPR interval lies above 0.9 and the FPR interval below 0.1, which with no miss and no
false alarm needs :func:`runs_to_establish` (35) runs on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pfi_rag.probes import precision
from pfi_rag.probes.precision import Z95  # the standard normal's 97.5% quantile: two-sided 95%

GOAL_TPR = 0.9
GOAL_FPR = 0.1
SEPARATES = 0.9  # AUROC at or above it: the metric ranks failed runs above clean ones
AT_CHANCE = 0.6  # AUROC at or below it: the metric does not see the failure


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / trials`` (default two-sided 95%)."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    return precision.wilson(successes / trials, trials, z)


def rate_with_interval(flags: list[bool]) -> tuple[float | None, list[float] | None, list[int]]:
    """(share of True, its Wilson 95% interval, [True count, total]); None, None when empty."""
    k, n = sum(flags), len(flags)
    if not n:
        return None, None, [0, 0]
    return k / n, list(wilson(k, n)), [k, n]


def runs_to_establish(goal: float = GOAL_TPR, *, z: float = Z95) -> int:
    """Runs, all detected, before the Wilson lower bound of n/n reaches ``goal`` (n/(n+z^2) >= goal).

    By symmetry the same number of clean runs without a false alarm puts the FPR's upper bound
    at 1 - goal: 35 either way for the 0.9 / 0.1 goal.
    """
    return math.ceil(goal * z * z / (1 - goal) - 1e-9)


# Best first: how close a probe came to the goal.
STATUSES = (
    "established",
    "met, not established",
    "separates, threshold misses",
    "weak",
    "at chance",
    "unknown",
)


@dataclass(frozen=True)
class GoalVerdict:
    status: str  # one of STATUSES
    why: str


def goal_verdict(
    *,
    tpr: float | None,
    tpr_ci: list[float] | None,
    fpr: float | None,
    fpr_ci: list[float] | None,
    auroc: float | None,
    failed_runs: int,
    clean_runs: int,
    reference_runs: int | None = None,
) -> GoalVerdict:
    """Does the probe reach TPR >= 0.9 at FPR <= 0.1, and if not, why, from the numbers alone.
    ``reference_runs``: the fewest clean runs a seed's calibrated thresholds came from."""
    if tpr is None or fpr is None or tpr_ci is None or fpr_ci is None:
        return GoalVerdict("unknown", "no verdicts to count (the probe skipped, or nothing to calibrate on)")
    if tpr_ci[0] >= GOAL_TPR and fpr_ci[1] <= GOAL_FPR:
        return GoalVerdict("established", f"TPR >= {tpr_ci[0]:.2f} and FPR <= {fpr_ci[1]:.2f} at 95%")
    need = runs_to_establish()
    if tpr >= GOAL_TPR and fpr <= GOAL_FPR:
        return GoalVerdict(
            "met, not established",
            f"the intervals are too wide ({failed_runs} failed, {clean_runs} clean runs): "
            f"more seeds; {need} of each with no miss and no false alarm would establish it",
        )
    if auroc is not None and auroc >= SEPARATES:
        return GoalVerdict(
            "separates, threshold misses",
            f"AUROC {auroc:.2f}: the metric ranks failed runs above clean ones but the threshold "
            f"(TPR {tpr:.2f}, FPR {fpr:.2f}) sits in the wrong place: more clean runs to "
            "calibrate on" + _reference_hint(reference_runs),
        )
    if auroc is not None and auroc <= AT_CHANCE:
        return GoalVerdict(
            "at chance",
            f"AUROC {auroc:.2f}: the statistic does not see this failure on this model "
            "(another statistic, or a model that learns what was planted)",
        )
    detail = f"AUROC {auroc:.2f}: " if auroc is not None else ""
    return GoalVerdict(
        "weak",
        f"{detail}failed and clean runs overlap (TPR {tpr:.2f}, FPR {fpr:.2f}): "
        "a stronger signal (more training of the planted client, a bigger model) or more seeds",
    )


def _reference_hint(runs: int | None) -> str:
    """What N clean reference runs promise against false alarms (1/(N+1)), and the N that
    promises 0.1. Runs, not reports: a run's earlier rounds do not tighten the bound."""
    if runs is None:
        return ""
    enough = math.ceil(1 / GOAL_FPR - 1 - 1e-9)
    return (
        f" ({runs} clean runs per seed bound false alarms by 1/{runs + 1}, however many rounds each "
        f"reports; {enough} runs bound them by 0.1)"
    )
