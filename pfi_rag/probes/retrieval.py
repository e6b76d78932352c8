"""Retrieval failures: planted facts not found, superseded facts served, answers not grounded.

- hit rate: for each held-out question, is the document that states its answer among the
  top-k hits (``retrieval.top_k``)?
- stale rate: for each versioned fact (manifest), does any top-k hit state the superseded
  value without the current one? Such a passage makes a stale answer, whether the update was
  never ingested or was ingested next to the old version instead of superseding it.
- groundedness: the share of an answer's content words found in the retrieved context,
  averaged over the held-out questions; answers come from ``ctx.answerer`` or, by default,
  from the client's model generating greedily from the context.

They need only a retriever with ``search(query, k) -> hits`` (context.Retriever).
"""

from __future__ import annotations

from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext, SearchHit
from pfi_rag.probes.lm import chat_prompt, greedy_answer
from pfi_rag.probes.metrics import support


class RetrievalHitProbe(ClientProbe):
    name = "retrieval_hit"
    mode = "retrieval misses planted facts"
    suites = ("rag",)
    needs = (Need.RETRIEVER, Need.CLIENT_DATA)
    metric = "hit_rate"
    fails_above = False
    bounds = {"hit_rate": (0.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        retriever = ctx.retriever(client_id)
        qa = ctx.client_data(client_id).qa
        if retriever is None or not qa:
            return self.skip(ctx, "client has no retriever or no held-out questions", client=client_id)
        k = ctx.config.retrieval.top_k
        misses = []
        for q in qa:
            found = [h.doc_id for h in retriever.search(q.question, k)]
            if q.doc_id not in found:
                misses.append({"question": q.question, "expected": q.doc_id, "retrieved": found})
        rate = 1 - len(misses) / len(qa)
        return self.result(
            ctx, rate, client=client_id, evidence={"questions": len(qa), "k": k, "misses": misses}
        )


class StaleProbe(ClientProbe):
    name = "stale"
    mode = "stale retrieval (superseded facts)"
    suites = ("rag",)
    needs = (Need.RETRIEVER, Need.MANIFEST)
    metric = "stale_rate"
    bounds = {"stale_rate": (0.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        retriever = ctx.retriever(client_id)
        versioned = (ctx.truth(client_id) or {}).get("versioned", [])
        if retriever is None or not versioned:
            return self.skip(ctx, "client has no retriever or no versioned facts", client=client_id)
        stale = []
        for fact in versioned:
            hits = retriever.search(fact["question"], ctx.config.retrieval.top_k)
            # Per passage, not per context: an old version served next to the new one still
            # states the superseded value as current (an update that never superseded it).
            served = [h.doc_id for h in hits if fact["old"] in h.text and fact["new"] not in h.text]
            if served:
                stale.append(
                    {
                        "question": fact["question"],
                        "served": fact["old"],
                        "current": fact["new"],
                        "doc_ids": served,
                    }
                )
        rate = len(stale) / len(versioned)
        return self.result(ctx, rate, client=client_id, evidence={"facts": len(versioned), "stale": stale})


def model_answerer(ctx: ProbeContext):
    """The default answerer: the client's model (else the base) answers from the hits, greedily."""

    def answer(client_id: str, question: str, hits: list[SearchHit]) -> str:
        model = ctx.client_model(client_id) or ctx.base_model()
        notes = "\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, start=1))
        prompt = chat_prompt(
            ctx.tokenizer, f"{ctx.config.serving.system_prompt}\n\nNotes:\n{notes}\n\nQuestion: {question}"
        )
        return greedy_answer(model, ctx.tokenizer, prompt, max_new_tokens=ctx.config.probes.answer_tokens)

    return answer


class GroundednessProbe(ClientProbe):
    name = "groundedness"
    mode = "ungrounded answers"
    suites = ("rag",)
    needs = (Need.RETRIEVER, Need.CLIENT_DATA, Need.CLIENT_ADAPTER)
    metric = "groundedness"
    fails_above = False
    bounds = {"groundedness": (0.0, 1.0)}

    def threshold(self, ctx: ProbeContext) -> float:
        return ctx.config.probes.grounding_min

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        retriever = ctx.retriever(client_id)
        qa = ctx.client_data(client_id).qa
        if retriever is None or not qa:
            return self.skip(ctx, "client has no retriever or no held-out questions", client=client_id)
        answerer = ctx.answerer or model_answerer(ctx)
        rows = []
        for q in qa:
            hits = retriever.search(q.question, ctx.config.retrieval.top_k)
            answer = answerer(client_id, q.question, hits)
            score = support(answer, " ".join(h.text for h in hits))
            rows.append({"question": q.question, "answer": answer[:200], "support": score})
        scored = [r["support"] for r in rows if r["support"] is not None]
        # An answer without content words ("I don't know.") asserts nothing: it is grounded.
        value = sum(scored) / len(scored) if scored else 1.0
        ungrounded = [r for r in rows if r["support"] is not None and r["support"] < self.threshold(ctx)]
        evidence = {"answers": len(rows), "ungrounded": ungrounded[:20]}
        return self.result(ctx, value, client=client_id, evidence=evidence)
