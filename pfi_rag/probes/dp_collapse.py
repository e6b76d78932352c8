"""DP-induced collapse: did the noise of DP training wipe out a client's personalization?

The gain is the drop in answer NLL (nats/token) on the client's evaluation items (held-out
questions, or cloze items from its held-out documents: probes/items.py) from the
base model to its adapter; a client whose adapter gains less than ``dp_collapse_threshold``
learned nothing it can use, which DP noise causes first in small clients (few records, so a
small expected batch against the same noise). The evidence gives the update signal-to-noise
ratio the ledger implies: a sum of B clipped per-sample gradients (norm <= B C) against noise
of norm ~ sigma C sqrt(d) per step, over T steps: SNR ~ B sqrt(T) / (sigma sqrt(d)), with B =
sample_rate x records and d the adapter's trainable parameters.
"""

from __future__ import annotations

import math

from pfi_rag.probes import missing
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.budget import ledger_spends, spend_sigma
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.items import EvalItem, answer_nll, choice_probs

TABLE_ITEMS = 50  # items in the accuracy table (6 multiple-choice passes each)
CONTEXT_CHARS = 1000  # retrieved text put before an item's prompt (~250 tokens)


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
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        items = ctx.eval_items(client_id)
        if not items:
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        trainable = sum(p.numel() for n, p in model.named_parameters() if f".{model.active_adapter}." in n)
        after = answer_nll(model, ctx.tokenizer, items)
        before = answer_nll(ctx.base_model(), ctx.tokenizer, items)
        records = ctx.corpus(client_id).records
        truth = ctx.truth(client_id) or {}
        evidence = {
            "answer_nll_base": before,
            "answer_nll_personalized": after,
            "items": len(items),
            "item_kind": items[0].kind,
            "records": records,
            "tiny_client": truth.get("tiny"),
            "update_snr": update_snr(ctx.ledger(client_id), records, trainable),
            "adapter_parameters": trainable,
            "accuracy": personalization_table(ctx, client_id, items[:TABLE_ITEMS]),
        }
        return self.result(ctx, before - after, client=client_id, evidence=evidence)


def personalization_table(ctx: ProbeContext, client_id: str, items: list[EvalItem]) -> dict:
    """Multiple-choice accuracy of base, global and client models, without and with retrieval.

    With retrieval, the client's top-k passages for the item's query precede the prompt, as in
    serving. The rows show where a client's gain comes from (its adapter, the federation, its
    documents) and whether DP left any of it.
    """
    retriever = ctx.retriever(client_id)
    contexts = None
    if retriever is not None:
        k = ctx.config.retrieval.top_k
        contexts = ["\n".join(h.text for h in retriever.search(i.query, k))[:CONTEXT_CHARS] for i in items]
    table: dict[str, dict[str, float]] = {}
    for name, load in (
        ("base", ctx.base_model),
        ("global", ctx.global_model),
        ("client", lambda: ctx.client_model(client_id)),
    ):
        row = {}
        for mode, prefix in (("no_retrieval", None), ("retrieval", contexts)):
            if mode == "retrieval" and prefix is None:
                continue
            model = load()  # re-fetched: the shared PEFT model switches adapters between loads
            if model is None:
                break
            probs, labels = choice_probs(model, ctx.tokenizer, items, prefix=prefix)
            row[mode] = float((probs.argmax(axis=1) == labels).mean())
        if row:
            table[name] = row
    table["items"] = len(items)
    return table
