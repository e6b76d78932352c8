"""Confidence miscalibration: does the personalized model's confidence match its accuracy?

Each evaluation item (probes/items.py: a synthetic client's held-out question, or a cloze item
from a real client's held-out documents) is a multiple choice over the true answer and
distractors of the same kind; confidence is the model's probability of its top choice. ECE
(equal-mass bins, ~30 items a bin, at most 10) and the Brier score are computed per client,
because pooling clients lets one overconfident client hide behind the others (the runner
reports the worst client).
"""

from __future__ import annotations

from pfi_rag.probes import missing
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.items import choice_probs
from pfi_rag.probes.metrics import brier, calibration_curve, ece_equal_mass

ITEMS_PER_BIN = 30
MAX_BINS = 10


class CalibrationProbe(ClientProbe):
    name = "calibration"
    mode = "confidence miscalibration"
    suites = ("fairness",)
    needs = (Need.CLIENT_ADAPTER, Need.CLIENT_DATA)
    metric = "ece"
    bounds = {"ece": (0.0, 1.0), "brier": (0.0, 2.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        items = [i for i in ctx.eval_items(client_id) if len(i.options) > 1]
        if not items:
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        probs, labels = choice_probs(model, ctx.tokenizer, items)
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        bins = max(1, min(MAX_BINS, len(items) // ITEMS_PER_BIN))
        value = ece_equal_mass(confidence, correct, bins=bins)
        evidence = {
            "items": len(items),
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
