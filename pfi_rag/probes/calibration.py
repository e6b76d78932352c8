"""Confidence miscalibration: does the personalized model's confidence match its accuracy?

Each held-out question becomes a multiple choice over the true answer and distractors of the
same kind; confidence is the model's probability of its top choice. ECE and the Brier score
are computed per client, because pooling clients lets one overconfident client hide behind
the others (the runner reports the worst client).
"""

from __future__ import annotations

import numpy as np

from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import answer_candidates, option_probs, qa_prompt
from pfi_rag.probes.metrics import brier, calibration_curve, ece


class CalibrationProbe(ClientProbe):
    name = "calibration"
    mode = "confidence miscalibration"
    suites = ("fairness",)
    needs = (Need.CLIENT_ADAPTER, Need.CLIENT_DATA)
    metric = "ece"
    bounds = {"ece": (0.0, 1.0), "brier": (0.0, 2.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        qa = ctx.client_data(client_id).qa
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, "client has no adapter", client=client_id)
        candidates = [
            answer_candidates(
                q.question, q.answer, count=ctx.config.probes.calibration_choices, seed=ctx.config.seed
            )
            for q in qa
        ]
        usable = [i for i, c in enumerate(candidates) if len(c) > 1]
        if not usable:
            return self.skip(ctx, "no held-out question has distractors", client=client_id)
        probs = option_probs(
            model,
            ctx.tokenizer,
            [qa_prompt(qa[i].question) for i in usable],
            # A leading space, as the answer follows "Answer:" in text (and in lm.answer_nll):
            # without it each option is scored as "Answer:Juniper", a tokenization no model saw.
            [[" " + c for c in candidates[i]] for i in usable],
            per_token=True,
        )
        labels = [candidates[i].index(qa[i].answer) for i in usable]
        width = max(len(p) for p in probs)
        padded = np.zeros((len(probs), width))
        for row, p in enumerate(probs):
            padded[row, : len(p)] = p
        confidence = padded.max(axis=1)
        correct = padded.argmax(axis=1) == np.array(labels)
        value = ece(confidence, correct)
        evidence = {
            "questions": len(usable),
            "accuracy": float(correct.mean()),
            "mean_confidence": float(confidence.mean()),
            "brier": brier(padded, labels),
            "curve": calibration_curve(confidence, correct),
        }
        return self.result(
            ctx,
            value,
            client=client_id,
            evidence=evidence,
            metrics={"ece": value, "brier": evidence["brier"]},
        )
