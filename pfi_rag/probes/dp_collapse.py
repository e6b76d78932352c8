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

import numpy as np

from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.budget import ledger_spends, spend_sigma
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.items import ItemScores, nll_gain, score_items

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
    order = 130
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
        threshold = self.threshold(ctx)
        gain = nll_gain(ctx, client_id, "base", f"client:{client_id}", threshold=threshold)
        scored = gain.n  # the items the precision needed
        records = ctx.corpus(client_id).records
        truth = ctx.truth(client_id) or {}
        evidence = {
            "answer_nll_base": ctx.item_scores("base", client_id, scored).answer_nll(),
            "answer_nll_personalized": ctx.item_scores(f"client:{client_id}", client_id, scored).answer_nll(),
            "interval": [gain.low, gain.high],
            "items": scored,
            "items_available": len(items),
            "item_kind": items[0].kind,
            "records": records,
            "tiny_client": truth.get("tiny"),
            "update_snr": update_snr(ctx.ledger(client_id), records, trainable),
            "adapter_parameters": trainable,
            "accuracy": personalization_table(ctx, client_id, scored, ctx.config.probes.table_items),
        }
        return self.result(ctx, gain.estimate, client=client_id, evidence=evidence)


def personalization_table(ctx: ProbeContext, client_id: str, plain_items: int, retrieval_items: int) -> dict:
    """Multiple-choice accuracy of base, global and client models, without and with retrieval.

    Without retrieval on the ``plain_items`` items the gain scored (no extra pass); with
    retrieval, the client's top-k passages for the item's query precede the prompt, as in
    serving, on the first ``retrieval_items`` items (``probes.table_items``; 0: no such column).
    The rows show where a client's gain comes from (its adapter, the federation, its documents)
    and whether DP left any of it.
    """
    items = ctx.eval_items(client_id)[:retrieval_items]
    retriever = ctx.retriever(client_id) if items else None
    contexts = None
    if retriever is not None:
        k = ctx.config.retrieval.top_k
        contexts = ["\n".join(h.text for h in retriever.search(i.query, k))[:CONTEXT_CHARS] for i in items]
    table: dict[str, dict | int] = {}
    for name, key in (("base", "base"), ("global", "global"), ("client", f"client:{client_id}")):
        plain = ctx.item_scores(key, client_id, plain_items)  # what the gain computed already
        if plain is None:
            continue
        row = {"no_retrieval": _accuracy(plain)}
        if contexts is not None:
            with_context = score_items(ctx.model(key), ctx.tokenizer, items, prefix=contexts)
            row["retrieval"] = _accuracy(with_context)
        table[name] = row
    table["items"] = plain_items
    table["retrieval_items"] = len(items) if contexts is not None else 0
    return table


def _accuracy(scores: ItemScores) -> dict[str, float]:
    """Multiple-choice accuracy with its exact 95% interval."""
    correct = int((scores.probs().argmax(axis=1) == np.array(scores.labels)).sum())
    interval = precision.proportion(correct, len(scores))
    return {"accuracy": interval.estimate, "low": interval.low, "high": interval.high}
