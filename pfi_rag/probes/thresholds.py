"""Probe thresholds calibrated on reports of deployments the operator trusts.

The configured thresholds are absolute and sized for a model that knows something; a small or
random model moves its metrics 5-10x less, so a real failure can separate from the healthy runs
(AUROC 1 in the benchmark) and still stay under the threshold. Calibration replaces each
threshold with the worst value the probe reached on N reference reports (``pfi-rag probe --out``
runs of healthy states: other seeds, earlier rounds, a staging federation).

Why the worst value: if a new healthy run and the N references are exchangeable, the chance that
it is worse than all of them is at most 1 / (N + 1) (a conformal bound). So 19 references give
at most a 5% false alarm rate per probe, 4 references 20%. The bound holds for any metric
distribution; it does not hold if the references were not healthy or not comparable (another
model, other data sizes). Reports of earlier rounds of one run (the silent-failure benchmark
leaves one per clean run and round under ``bench-silent-failures/references/``) are correlated
and younger than a final state: for a metric that grows with the rounds their values are milder,
the threshold comes out tighter, and a healthy final state fails more often than 1 / (N + 1).
Count on the bound only for references taken at the same point of a run.

The output is a TOML ``[probes]`` table of ``<probe>_threshold`` keys, used through
``probes.thresholds_file`` (config.with_probe_thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from annotated_types import Ge, Gt, Le, Lt

from pfi_rag.config import ProbesConfig
from pfi_rag.probes.registry import probe_named


@dataclass(frozen=True)
class CalibratedThreshold:
    probe: str
    metric: str
    fails_above: bool
    threshold: float  # the worst reference value, kept inside the config field's limits
    configured: float  # the threshold the references were judged with
    references: int

    @property
    def false_alarm_bound(self) -> float:
        return 1 / (self.references + 1)


def calibrate(reports: Sequence[dict[str, Any]]) -> list[CalibratedThreshold]:
    """One threshold per probe that has a finite value in every report (``report.json`` dicts).

    Probes skipped or errored in any report are left out: a reference that did not measure the
    probe says nothing about its healthy range. So is a probe whose references measured another
    metric than it reads now (reports from before its metric changed): their values are on
    another scale.
    """
    if not reports:
        raise ValueError("give at least one reference report")
    per_probe: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        for summary in report.get("probes", []):
            per_probe.setdefault(summary["probe"], []).append(summary)
    calibrated = []
    for probe, summaries in sorted(per_probe.items()):
        field = f"{probe}_threshold"
        values = [s.get("value") for s in summaries if s.get("verdict") in ("pass", "fail")]
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not _configurable(probe) or len(finite) < len(reports):
            continue
        if {str(s["metric"]) for s in summaries} != {_current_metric(probe, summaries[0]["metric"])}:
            continue
        fails_above = bool(summaries[0]["fails_above"])
        worst = max(finite) if fails_above else min(finite)
        calibrated.append(
            CalibratedThreshold(
                probe=probe,
                metric=str(summaries[0]["metric"]),
                fails_above=fails_above,
                threshold=_within_limits(field, worst),
                configured=float(summaries[0]["threshold"]),
                references=len(reports),
            )
        )
    return calibrated


def _configurable(probe: str) -> bool:
    """Whether ``probe`` has a threshold to set: a config field, or a registered probe's default."""
    if f"{probe}_threshold" in ProbesConfig.model_fields:
        return True
    try:
        return probe_named(probe).default_threshold is not None
    except KeyError:
        return False


def _current_metric(probe: str, reported: str) -> str:
    """The metric ``probe`` reads today (``reported`` for a probe this version does not know)."""
    try:
        return probe_named(probe).metric
    except KeyError:
        return str(reported)


def _within_limits(field: str, value: float) -> float:
    """``value`` moved inside the config field's bounds (e.g. a bias gap below 0 becomes 0)."""
    if field not in ProbesConfig.model_fields:  # a probe without a config key: no bounds
        return value
    for limit in ProbesConfig.model_fields[field].metadata:
        if isinstance(limit, Ge):
            value = max(value, float(limit.ge))
        elif isinstance(limit, Gt):
            value = max(value, math.nextafter(float(limit.gt), math.inf))
        elif isinstance(limit, Le):
            value = min(value, float(limit.le))
        elif isinstance(limit, Lt):
            value = min(value, math.nextafter(float(limit.lt), -math.inf))
    return value


def thresholds_toml(calibrated: Sequence[CalibratedThreshold], sources: Sequence[str]) -> str:
    """The ``[probes]`` table to point ``probes.thresholds_file`` at, with how each was made."""
    lines = [
        f"# Probe thresholds calibrated by `pfi-rag calibrate-probes` on {len(sources)} reference report(s):",
        *(f"#   {source}" for source in sources),
        f"# A healthy run exceeds each with probability <= 1/{len(sources) + 1} (conformal bound).",
        "[probes]",
    ]
    for item in calibrated:
        side = "above" if item.fails_above else "below"
        lines.append(
            f"{item.probe}_threshold = {item.threshold!r}  "
            f"# {item.metric}: fails {side}; was {item.configured:g}"
        )
    return "\n".join(lines) + "\n"
