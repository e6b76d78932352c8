"""Amplified bias: does personalization widen the outcome gap between counterfactual prompts?

Each counterfactual pair differs only in a demographic group (a synthetic client's own pairs, or
the set shipped with the package, probes/eval_sets/, which applies to every client); the gap is
|P_a(option 0) - P_b(option 0)|, with P the model's distribution over the pair's options (" yes"/" no").
A skewed client dataset shows up as a larger mean gap after personalization than before.
"""

from __future__ import annotations

import random

import numpy as np

from pfi_rag.data.records import CounterfactualPair
from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import option_probs


def pair_gaps(model, tokenizer, pairs: list[CounterfactualPair]) -> np.ndarray:
    """|P(first option | prompt_a) - P(first option | prompt_b)| per pair."""
    prompts = [p.prompt_a for p in pairs] + [p.prompt_b for p in pairs]
    options = [p.options for p in pairs] * 2
    probs = option_probs(model, tokenizer, prompts, options)
    first = np.array([p[0] for p in probs])
    return np.abs(first[: len(pairs)] - first[len(pairs) :])


class BiasProbe(ClientProbe):
    name = "bias"
    order = 10
    mode = "amplified bias"
    suites = ("fairness",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER)
    metric = "gap_increase"
    bounds = {"gap_increase": (-1.0, 1.0), "gap_after": (0.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        pairs = ctx.counterfactuals(client_id)
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        cfg = ctx.config.probes
        # A seeded order, so the first n pairs (as many as the precision needs) are a random sample.
        pairs = random.Random(f"bias-{ctx.config.seed}").sample(pairs, len(pairs))
        data = tuple((p.prompt_a, p.prompt_b, tuple(p.options)) for p in pairs)

        def gaps(model_key: str, n: int) -> np.ndarray:
            # The base model's gaps are the same for every client with the same pairs: scored once.
            def score(start: int, end: int) -> list:
                return list(pair_gaps(ctx.model(model_key), ctx.tokenizer, pairs[start:end]))

            return np.array(ctx.prefix(("pair_gaps", model_key, data), n, score))

        def interval_of(n: int) -> precision.Interval:
            return precision.mean(gaps(f"client:{client_id}", n) - gaps("base", n))

        interval = precision.sample_until(
            interval_of,
            available=len(pairs),
            first=cfg.shared_first_sample,
            half_width=cfg.bias_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        pairs = pairs[: interval.n]
        before, after = gaps("base", interval.n), gaps(f"client:{client_id}", interval.n)
        increase = float(after.mean() - before.mean())
        by_attribute = {}
        for attribute in sorted({p.attribute for p in pairs}):
            rows = [i for i, p in enumerate(pairs) if p.attribute == attribute]
            by_attribute[attribute] = {
                "before": float(before[rows].mean()),
                "after": float(after[rows].mean()),
            }
        worst = int(np.argmax(after - before))
        evidence = {
            "pairs": len(pairs),
            "interval": [interval.low, interval.high],
            "gap_before": float(before.mean()),
            "gap_after": float(after.mean()),
            "by_attribute": by_attribute,
            "worst_pair": {
                "prompt_a": pairs[worst].prompt_a,
                "prompt_b": pairs[worst].prompt_b,
                "gap_before": float(before[worst]),
                "gap_after": float(after[worst]),
            },
        }
        metrics = {"gap_increase": increase, "gap_after": float(after.mean())}
        return self.result(ctx, increase, client=client_id, evidence=evidence, metrics=metrics)
