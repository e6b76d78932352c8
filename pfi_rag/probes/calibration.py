"""Confidence miscalibration: does the personalized model's confidence match its accuracy?

Each evaluation item (probes/items.py: a synthetic client's held-out question, or a cloze item
from a real client's held-out documents) is a multiple choice over the true answer and
distractors of the same kind; confidence is the model's probability of its top choice. ECE
(equal-mass bins, ~30 items a bin, at most 10) and the Brier score are computed per client,
because pooling clients lets one overconfident client hide behind the others (the runner
reports the worst client).
"""

from __future__ import annotations

import numpy as np

from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.items import EvalItem, ItemScores
from pfi_rag.probes.metrics import brier, calibration_curve, ece_equal_mass

ITEMS_PER_BIN = 30
MAX_BINS = 10


class CalibrationProbe(ClientProbe):
    name = "calibration"
    order = 20
    mode = "confidence miscalibration"
    suites = ("fairness",)
    needs = (Need.CLIENT_ADAPTER, Need.CLIENT_DATA)
    metric = "ece"
    bounds = {"ece": (0.0, 1.0), "brier": (0.0, 2.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        items = ctx.eval_items(client_id)
        if not any(len(i.options) > 1 for i in items):
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        cfg = ctx.config.probes
        key = f"client:{client_id}"

        def interval_of(n: int) -> precision.Interval:
            probs, labels = choice_table(ctx.item_scores(key, client_id, n), items[:n])
            if not len(labels):  # no item with distractors among the first n: sample on
                return precision.Interval(0.0, 0.0, 1.0, n, "no items yet")
            confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
            bins = max(1, min(MAX_BINS, len(labels) // ITEMS_PER_BIN))
            return precision.bootstrap(
                lambda rows: ece_equal_mass(confidence[rows], correct[rows], bins=bins),
                len(labels),
                seed=ctx.config.seed,
            )

        interval = precision.sample_until(
            interval_of,
            available=len(items),
            first=max(cfg.items_first_sample, ITEMS_PER_BIN),
            half_width=cfg.ece_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        probs, labels = choice_table(ctx.item_scores(key, client_id, interval.n), items[: interval.n])
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        bins = max(1, min(MAX_BINS, len(labels) // ITEMS_PER_BIN))
        value = ece_equal_mass(confidence, correct, bins=bins)
        evidence = {
            "interval": [interval.low, interval.high],
            "items": len(labels),
            "items_available": len(items),
            "item_kind": items[0].kind,
            "bins": bins,
            "accuracy": float(correct.mean()),
            "chance": float((1 / (probs > 0).sum(axis=1)).mean()),
            "mean_confidence": float(confidence.mean()),
            "brier": brier(probs, labels),
            "curve": calibration_curve(confidence, correct),
        }
        return self.result(
            ctx,
            value,
            client=client_id,
            evidence=evidence,
            metrics={"ece": value, "brier": evidence["brier"]},
        )


def choice_table(scores: ItemScores, items: list[EvalItem]) -> tuple[np.ndarray, np.ndarray]:
    """(option probabilities, true labels) of the items that have distractors (a choice to make)."""
    keep = [i for i, item in enumerate(items) if len(item.options) > 1]
    return scores.probs()[keep], np.array(scores.labels)[keep]
