"""Adaptation misalignment, capability: does a narrow local objective erode general capability?

Before (base) vs after (the client's adapter): perplexity on the shared general-capability
texts. They ship with the package (probes/eval_sets/); a data root's own ``shared/`` files take
their place.
"""

from __future__ import annotations

import math
import random

import numpy as np

from pfi_rag.models.scoring import continuation_nll
from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext


class CapabilityProbe(ClientProbe):
    name = "capability"
    order = 40
    mode = "adaptation misalignment"
    suites = ("fairness",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER)
    metric = "perplexity_ratio"
    bounds = {"perplexity_ratio": (0.5, 3.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        texts = [t.text for t in ctx.shared_eval()[0]]
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        if not texts:
            return self.skip(ctx, "shared/general_eval.jsonl is empty: remove it to use the shipped set")
        cfg = ctx.config.probes
        texts = random.Random(f"capability-{ctx.config.seed}").sample(texts, len(texts))  # prefixes: samples

        def nll(model_key: str, n: int) -> np.ndarray:
            # The base model's scores of the shared texts are the same for every client: scored once.
            def score(start: int, end: int) -> list:
                return list(text_nll(ctx.model(model_key), ctx.tokenizer, texts[start:end]))

            return np.array(ctx.prefix(("text_nll", model_key, tuple(texts)), n, score))

        def interval_of(n: int) -> precision.Interval:
            before, after = nll("base", n), nll(f"client:{client_id}", n)
            # log(ppl_after / ppl_before) is a ratio of sums over texts: its interval, exponentiated.
            log_ratio = precision.ratio(after[:, 0] - before[:, 0], before[:, 1])
            bounds = (math.exp(log_ratio.low), math.exp(log_ratio.high))
            return precision.Interval(math.exp(log_ratio.estimate), *bounds, n, "ratio estimator, exp")

        interval = precision.sample_until(
            interval_of,
            available=len(texts),
            first=cfg.shared_first_sample,
            half_width=cfg.capability_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        before, after = nll("base", interval.n), nll(f"client:{client_id}", interval.n)
        evidence = {
            "perplexity_before": math.exp(before[:, 0].sum() / before[:, 1].sum()),
            "perplexity_after": math.exp(after[:, 0].sum() / after[:, 1].sum()),
            "interval": [interval.low, interval.high],
            "texts": interval.n,
            "texts_available": len(texts),
        }
        value = evidence["perplexity_after"] / evidence["perplexity_before"]
        return self.result(ctx, value, client=client_id, evidence=evidence)


def text_nll(model, tokenizer, texts: list[str]) -> np.ndarray:
    """(T, 2): each text's summed NLL (nats) and its scored tokens."""
    return np.array(continuation_nll(model, tokenizer, [""] * len(texts), texts), dtype=float)
