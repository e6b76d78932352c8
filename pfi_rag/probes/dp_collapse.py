"""DP-induced collapse: did the noise of DP training wipe out a client's personalization?

The gain is the drop in answer NLL (nats/token) on the client's held-out questions from the
base model to its adapter; a client whose adapter gains less than ``dp_collapse_threshold``
learned nothing it can use, which DP noise causes first in small clients (few records, so a
small expected batch against the same noise). The evidence gives the update signal-to-noise
ratio the ledger implies: a sum of B clipped per-sample gradients (norm <= B C) against noise
of norm ~ sigma C sqrt(d) per step, over T steps: SNR ~ B sqrt(T) / (sigma sqrt(d)), with B =
sample_rate x records and d the adapter's trainable parameters.
"""

from __future__ import annotations

import math

from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.budget import ledger_spends, spend_sigma
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import answer_nll


def update_snr(ledger: dict | None, records: int, trainable: int) -> float | None:
    """The SNR of the last spend (None when the ledger lacks a field or has no noise)."""
    spends = ledger_spends(ledger or {})
    if not spends or trainable <= 0:
        return None
    last = spends[-1]
    sigma = spend_sigma(last)
    if not sigma or last.get("sample_rate") is None or last.get("steps") is None:
        return None
    batch = float(last["sample_rate"]) * records
    return batch * math.sqrt(int(last["steps"])) / (sigma * math.sqrt(trainable))


class DPCollapseProbe(ClientProbe):
    name = "dp_collapse"
    mode = "DP-induced collapse"
    suites = ("privacy",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.CLIENT_DATA, Need.LEDGER)
    metric = "personalization_gain"
    fails_above = False
    bounds = {"personalization_gain": (-2.0, 2.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        data = ctx.client_data(client_id)
        model = ctx.client_model(client_id)
        if model is None or not data.qa:
            return self.skip(ctx, "client has no adapter or no held-out questions", client=client_id)
        before = answer_nll(ctx.base_model(), ctx.tokenizer, data.qa)
        after = answer_nll(model, ctx.tokenizer, data.qa)
        trainable = sum(p.numel() for n, p in model.named_parameters() if f".{model.active_adapter}." in n)
        records = len(data.documents) + len(data.instructions)
        truth = ctx.truth(client_id) or {}
        evidence = {
            "answer_nll_base": before,
            "answer_nll_personalized": after,
            "records": records,
            "tiny_client": truth.get("tiny"),
            "update_snr": update_snr(ctx.ledger(client_id), records, trainable),
            "adapter_parameters": trainable,
        }
        return self.result(ctx, before - after, client=client_id, evidence=evidence)
