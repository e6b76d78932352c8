"""Confidence miscalibration: did personalization make the model's confidence stop matching its accuracy?

Each evaluation item (probes/items.py: a synthetic client's held-out question, or a cloze item
from a real client's held-out documents) is a multiple choice over the true answer and
distractors of the same kind; confidence is the model's probability of its top choice. ECE
(equal-mass bins, ~30 items a bin, at most 10) is computed per client for the personalized model
and for the base model on the same items, because pooling clients lets one overconfident client
hide behind the others (the runner reports the worst client).

The verdict reads the increase over the base model, as ``bias`` reads its gap's increase: a small
model is already miscalibrated on a client's own text (SmolLM2-135M's ECE on the synthetic
clients' questions is 0.24-0.63 before any training), and an absolute threshold would flag every
client of every healthy federation for what the base model does. The absolute ECE and the Brier
score stay in the evidence.
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
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.CLIENT_DATA)
    metric = "ece_increase"
    bounds = {"ece_increase": (-1.0, 1.0), "brier": (0.0, 2.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        items = ctx.eval_items(client_id)
        if not any(len(i.options) > 1 for i in items):
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        cfg = ctx.config.probes
        key = f"client:{client_id}"

        def choices(model_key: str, n: int) -> Choices:
            return Choices(*choice_table(ctx.item_scores(model_key, client_id, n), items[:n]))

        def interval_of(n: int) -> precision.Interval:
            personalized, base = choices(key, n), choices("base", n)
            if not len(personalized.labels):  # no item with distractors among the first n: sample on
                return precision.Interval(0.0, 0.0, 1.0, n, "no items yet")
            bins = bins_for(len(personalized.labels))
            return precision.bootstrap(
                lambda rows: personalized.ece(rows, bins) - base.ece(rows, bins),
                len(personalized.labels),
                seed=ctx.config.seed,
            )

        interval = precision.sample_until(
            interval_of,
            available=len(items),
            first=max(cfg.items_first_sample, ITEMS_PER_BIN),
            half_width=cfg.ece_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        personalized, base = choices(key, interval.n), choices("base", interval.n)
        every = np.arange(len(personalized.labels))
        bins = bins_for(len(every))
        ece, ece_base = personalized.ece(every, bins), base.ece(every, bins)
        evidence = {
            "interval": [interval.low, interval.high],
            "ece": ece,
            "ece_base": ece_base,
            "items": len(every),
            "items_available": len(items),
            "item_kind": items[0].kind,
            "bins": bins,
            "accuracy": float(personalized.correct.mean()),
            "accuracy_base": float(base.correct.mean()),
            "chance": float((1 / (personalized.probs > 0).sum(axis=1)).mean()),
            "mean_confidence": float(personalized.confidence.mean()),
            "mean_confidence_base": float(base.confidence.mean()),
            "brier": brier(personalized.probs, personalized.labels),
            "curve": calibration_curve(personalized.confidence, personalized.correct),
        }
        return self.result(
            ctx,
            ece - ece_base,
            client=client_id,
            evidence=evidence,
            metrics={"ece_increase": ece - ece_base, "brier": evidence["brier"]},
        )


class Choices:
    """One model's answers to the items that have distractors: option probabilities, true labels,
    and from them its confidence (top probability) and whether its top choice is right."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray):
        self.probs, self.labels = probs, labels
        self.confidence = probs.max(axis=1) if len(labels) else np.zeros(0)
        self.correct = probs.argmax(axis=1) == labels if len(labels) else np.zeros(0, dtype=bool)

    def ece(self, rows: np.ndarray, bins: int) -> float:
        return ece_equal_mass(self.confidence[rows], self.correct[rows], bins=bins)


def bins_for(items: int) -> int:
    """Equal-mass bins of ~ITEMS_PER_BIN items, at least 1 and at most MAX_BINS."""
    return max(1, min(MAX_BINS, items // ITEMS_PER_BIN))


def choice_table(scores: ItemScores, items: list[EvalItem]) -> tuple[np.ndarray, np.ndarray]:
    """(option probabilities, true labels) of the items that have distractors (a choice to make)."""
    keep = [i for i, item in enumerate(items) if len(item.options) > 1]
    return scores.probs()[keep], np.array(scores.labels)[keep]
