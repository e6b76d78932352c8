"""Poisoned or broken updates, from the round history (probes/history.py).

Per round: an update whose norm has a robust z-score (median/MAD over the round's updates)
above ``update_outliers_z``, a cosine to the mean update below ``update_outliers_cosine``
(pulling against everyone else: poisoned or broken), or a non-finite norm.
"""

from __future__ import annotations

import math

from pfi_rag.probes import missing
from pfi_rag.probes.base import FLAGGED_CLIENTS, FederationProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import robust_z

MIN_UPDATES_FOR_Z = 3  # a median and MAD of fewer updates say nothing


# A norm must stray by more than (z threshold x 5%) of the median norm to be an outlier: scaled
# or sign-flipped (poisoned) updates differ by multiples, DP noise makes honest ones near-equal.
NORM_SCALE_FLOOR = 0.05


class UpdateOutliersProbe(FederationProbe):
    name = "update_outliers"
    order = 170
    mode = "poisoned or broken updates"
    suites = ("federation",)
    needs = (Need.HISTORY,)
    metric = "outlier_updates"

    def run_federation(self, ctx: ProbeContext, client_ids: list[str]) -> ProbeResult:
        rounds = ctx.history()
        if not rounds:
            return self.skip(ctx, missing.NO_HISTORY)
        cfg = ctx.config.probes
        outliers = []
        per_round = []
        for r in rounds:
            ids = sorted(r.updates)
            norms = [r.updates[c].norm for c in ids]
            finite = [c for c in ids if math.isfinite(r.updates[c].norm)]
            z = (
                dict(
                    zip(finite, robust_z([r.updates[c].norm for c in finite], NORM_SCALE_FLOOR), strict=True)
                )
                if finite
                else {}
            )
            for c in ids:
                update = r.updates[c]
                reasons = []
                if not math.isfinite(update.norm):
                    reasons.append(f"norm {update.norm}")
                elif len(finite) >= MIN_UPDATES_FOR_Z and abs(z[c]) > cfg.update_outliers_z:
                    reasons.append(f"norm {update.norm:.4g} (robust z {z[c]:.1f})")
                if update.cosine_to_mean is not None and update.cosine_to_mean < cfg.update_outliers_cosine:
                    reasons.append(f"cosine to mean {update.cosine_to_mean:.3f}")
                if reasons:
                    outliers.append({"round": r.number, "client": c, "why": "; ".join(reasons)})
            per_round.append(
                {
                    "round": r.number,
                    "norms": dict(zip(ids, norms, strict=True)),
                    "cosines": {c: r.updates[c].cosine_to_mean for c in ids},
                }
            )
        evidence = {
            "outliers": outliers,
            "rounds": per_round,
            FLAGGED_CLIENTS: sorted({o["client"] for o in outliers}),
        }
        return self.result(ctx, float(len(outliers)), evidence=evidence)
