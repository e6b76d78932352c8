"""Fairness collapse: does the federated, personalized model leave some clients worse off?

Per client, the answer NLL (nats/token) of its evaluation items (held-out questions, or cloze
items from its held-out documents: probes/items.py) is measured under the
personalized adapter, the global adapter and the adapter the client trained alone
(``clients/<id>/local_adapter/``; the base model stands in when there is none, and the
evidence says so). The gain over alone is NLL_alone - NLL_personalized; a client fails when
it is more than ``fairness_threshold`` nats/token worse off than training alone: federated
averages hide exactly these clients. Utility, for the spread and Gini, is exp(-NLL), the
geometric-mean probability of the true answer tokens, in (0, 1]. The federation summary adds
the worst client, spread, Gini of personalized
utility and the share of clients worse off than alone.
"""

from __future__ import annotations

import math
from typing import Any

from pfi_rag.probes import missing
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.items import nll_gain
from pfi_rag.probes.metrics import gini


class FairnessProbe(ClientProbe):
    name = "fairness"
    order = 30
    mode = "fairness collapse"
    suites = ("fairness", "federation")
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.GLOBAL_ADAPTER, Need.LOCAL_ADAPTER, Need.CLIENT_DATA)
    metric = "gain_over_alone"
    fails_above = False
    bounds = {"gain_over_alone": (-3.0, 3.0), "utility_personalized": (0.0, 1.0)}

    def threshold(self, ctx: ProbeContext) -> float:
        return -ctx.config.probes.fairness_threshold

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        personalized = ctx.client_model(client_id)
        if personalized is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        qa = ctx.eval_items(client_id)
        if not qa:
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        personalized_key = f"client:{client_id}"
        baseline = "local" if ctx.local_model(client_id) is not None else "base"
        baseline_key = f"local:{client_id}" if baseline == "local" else "base"
        # gain = NLL_alone - NLL_personalized, on as many items as its precision needs.
        gain = nll_gain(ctx, client_id, baseline_key, personalized_key, threshold=self.threshold(ctx))
        keys = {
            "personalized": personalized_key,
            "global": "global",
            "local": f"local:{client_id}",
            "base": "base",
        }
        nll: dict[str, float | None] = {}
        for name, key in keys.items():
            scores = ctx.item_scores(key, client_id, gain.n)
            nll[name] = None if scores is None else scores.answer_nll()
        utilities = {k: None if v is None else math.exp(-v) for k, v in nll.items()}
        evidence = {
            "answer_nll": nll,
            "utility": utilities,
            "baseline": baseline,
            "interval": [gain.low, gain.high],
            "items": gain.n,
            "items_available": len(qa),
        }
        metrics = {"gain_over_alone": gain.estimate, "utility_personalized": utilities["personalized"]}
        return self.result(ctx, gain.estimate, client=client_id, evidence=evidence, metrics=metrics)

    def summarize(self, per_client: dict[str, dict[str, float]]) -> dict[str, Any]:
        utilities = [max(0.0, m["utility_personalized"]) for m in per_client.values()]
        gains = [m["gain_over_alone"] for m in per_client.values()]
        if not utilities:
            return {}
        return {
            "gini_utility": gini(utilities),
            "worst_utility": min(utilities),
            "utility_spread": max(utilities) - min(utilities),
            "share_worse_off_than_alone": sum(g < 0 for g in gains) / len(gains),
        }
