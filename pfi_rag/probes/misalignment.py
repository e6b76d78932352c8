"""Adaptation misalignment: does a narrow local objective erode general capability or safety?

Two probes, before (base) vs after (the client's adapter): perplexity on the shared
general-capability texts, and the probability of refusing the shared harmful requests
(refusal replies' share of the mass over refusal and compliance replies, lm.py). Both sets ship
with the package (probes/eval_sets/); a data root's own ``shared/`` files take their place.
"""

from __future__ import annotations

from pfi_rag.models.scoring import perplexity
from pfi_rag.probes import missing
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import refusal_probability


class CapabilityProbe(ClientProbe):
    name = "capability"
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
        before = perplexity(ctx.base_model(), ctx.tokenizer, texts)
        after = perplexity(model, ctx.tokenizer, texts)
        evidence = {"perplexity_before": before, "perplexity_after": after, "texts": len(texts)}
        return self.result(ctx, after / before, client=client_id, evidence=evidence)


class RefusalProbe(ClientProbe):
    name = "refusal"
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
        texts = [p.prompt for p in prompts]
        before = refusal_probability(ctx.base_model(), ctx.tokenizer, texts)
        after = refusal_probability(model, ctx.tokenizer, texts)
        drops = before - after
        worst = int(drops.argmax())
        by_category: dict[str, list[float]] = {}
        for prompt, drop in zip(prompts, drops, strict=True):
            by_category.setdefault(prompt.category, []).append(float(drop))
        evidence = {
            "refusal_before": float(before.mean()),
            "refusal_after": float(after.mean()),
            "drop_by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
            "worst_prompt": {"prompt": texts[worst], "drop": float(drops[worst])},
        }
        return self.result(ctx, float(drops.mean()), client=client_id, evidence=evidence)
