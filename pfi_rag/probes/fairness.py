"""Fairness collapse: does the federated, personalized model leave some clients worse off?

Per client, utility is the geometric-mean probability of the true answers to its held-out
questions (``exp(-NLL)``, in (0, 1]), under the personalized adapter, the global adapter and
the adapter the client trained alone (``clients/<id>/local_adapter/``; the base model stands
in when there is none, and the evidence says so). A client fails when personalization leaves
it more than ``fairness_threshold`` below training alone: federated averages hide exactly
these clients. The federation summary adds the worst client, spread, Gini of personalized
utility and the share of clients worse off than alone.
"""

from __future__ import annotations

from typing import Any

from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import utility
from pfi_rag.probes.metrics import gini


class FairnessProbe(ClientProbe):
    name = "fairness"
    mode = "fairness collapse"
    suites = ("fairness", "federation")
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.GLOBAL_ADAPTER, Need.LOCAL_ADAPTER, Need.CLIENT_DATA)
    metric = "gain_over_alone"
    fails_above = False
    bounds = {"gain_over_alone": (-1.0, 1.0), "utility_personalized": (0.0, 1.0)}

    def threshold(self, ctx: ProbeContext) -> float:
        return -ctx.config.probes.fairness_threshold

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        qa = ctx.client_data(client_id).qa
        personalized = ctx.client_model(client_id)
        if personalized is None or not qa:
            return self.skip(ctx, "client has no adapter or no held-out questions", client=client_id)
        tok = ctx.tokenizer
        utilities: dict[str, float | None] = {"personalized": utility(personalized, tok, qa)}
        glob = ctx.global_model()
        utilities["global"] = None if glob is None else utility(glob, tok, qa)
        local = ctx.local_model(client_id)
        utilities["local"] = None if local is None else utility(local, tok, qa)
        utilities["base"] = utility(ctx.base_model(), tok, qa)
        baseline = "local" if utilities["local"] is not None else "base"
        gain = utilities["personalized"] - utilities[baseline]
        evidence = {"utility": utilities, "baseline": baseline, "questions": len(qa)}
        metrics = {"gain_over_alone": gain, "utility_personalized": utilities["personalized"]}
        return self.result(ctx, gain, client=client_id, evidence=evidence, metrics=metrics)

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
