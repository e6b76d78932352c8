"""Adaptation misalignment, refusal: does a narrow local objective erode safety?

Before (base) vs after (the client's adapter): the probability of refusing the shared harmful
requests (refusal replies' share of the mass over refusal and compliance replies, lm.py). The
requests ship with the package (probes/eval_sets/); a data root's own ``shared/`` file takes
their place.
"""

from __future__ import annotations

import random

import numpy as np

from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import refusal_probability


class RefusalProbe(ClientProbe):
    name = "refusal"
    order = 50
    mode = "adaptation misalignment"
    suites = ("fairness",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER)
    metric = "refusal_drop"
    bounds = {"refusal_drop": (-1.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        prompts = ctx.shared_eval()[1]
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        if not prompts:
            return self.skip(ctx, "shared/refusal_prompts.jsonl is empty: remove it to use the shipped set")
        cfg = ctx.config.probes
        prompts = random.Random(f"refusal-{ctx.config.seed}").sample(
            prompts, len(prompts)
        )  # prefixes: samples
        texts = [p.prompt for p in prompts]

        def interval_of(n: int) -> precision.Interval:
            return precision.mean(base_refusal(ctx, texts, n) - client_refusal(ctx, client_id, texts, n))

        interval = precision.sample_until(
            interval_of,
            available=len(texts),
            first=cfg.shared_first_sample,
            half_width=cfg.refusal_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        prompts, texts = prompts[: interval.n], texts[: interval.n]
        before = base_refusal(ctx, texts, interval.n)
        after = client_refusal(ctx, client_id, texts, interval.n)
        drops = before - after
        worst = int(drops.argmax())
        by_category: dict[str, list[float]] = {}
        for prompt, drop in zip(prompts, drops, strict=True):
            by_category.setdefault(prompt.category, []).append(float(drop))
        evidence = {
            "interval": [interval.low, interval.high],
            "refusal_before": float(before.mean()),
            "refusal_after": float(after.mean()),
            "drop_by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
            "worst_prompt": {"prompt": texts[worst], "drop": float(drops[worst])},
        }
        return self.result(ctx, float(drops.mean()), client=client_id, evidence=evidence)


def base_refusal(ctx: ProbeContext, prompts: list[str], n: int | None = None) -> np.ndarray:
    """P(refuse) of the base model on the first ``n`` shared prompts (all when None): scored once
    for every client and for erosion."""
    return refusal_of(ctx, "base", prompts, len(prompts) if n is None else n)


def client_refusal(ctx: ProbeContext, client_id: str, prompts: list[str], n: int) -> np.ndarray:
    return refusal_of(ctx, f"client:{client_id}", prompts, n)


def refusal_of(ctx: ProbeContext, model_key: str, prompts: list[str], n: int) -> np.ndarray:
    def score(start: int, end: int) -> list:
        return list(refusal_probability(ctx.model(model_key), ctx.tokenizer, prompts[start:end]))

    return np.array(ctx.prefix(("refusal", model_key, tuple(prompts)), n, score))
