"""Retrieval misses known facts: the hit rate.

For each evaluation item (a held-out question, or a cloze item from a held-out document:
probes/items.py), is the document that states its answer among the top-k hits
(``retrieval.top_k``)? It needs a retriever with ``search(query, k) -> hits`` (context.Retriever).
"""

from __future__ import annotations

from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext


class RetrievalHitProbe(ClientProbe):
    name = "retrieval_hit"
    order = 140
    mode = "retrieval misses known facts"
    suites = ("rag",)
    needs = (Need.RETRIEVER, Need.CLIENT_DATA)
    metric = "hit_rate"
    fails_above = False
    bounds = {"hit_rate": (0.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        retriever = ctx.retriever(client_id)
        if retriever is None:
            return self.skip(ctx, missing.no_index(client_id), client=client_id)
        qa = ctx.eval_items(client_id)
        if not qa:
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        k = ctx.config.retrieval.top_k
        cfg = ctx.config.probes
        misses: list[dict] = []
        asked: list = []

        def interval_of(n: int) -> precision.Interval:
            for q in qa[len(asked) : n]:
                asked.append(q)
                found = [h.doc_id for h in ctx.search(client_id, q.query, k)]
                if q.doc_id not in found:
                    misses.append({"query": q.query, "expected": q.doc_id, "retrieved": found})
            return precision.proportion(n - len(misses), n)

        interval = precision.sample_until(
            interval_of,
            available=len(qa),
            first=cfg.items_first_sample,
            half_width=cfg.hit_rate_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        rate = interval.estimate
        evidence = {
            "queries": interval.n,
            "items_available": len(qa),
            "interval": [interval.low, interval.high],
            "item_kind": qa[0].kind,
            "k": k,
            "misses": misses[:20],
        }
        return self.result(ctx, rate, client=client_id, evidence=evidence)
