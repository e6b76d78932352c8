"""Ungrounded answers: the share of an answer's content words found in the passages it was given.

Averaged over the evaluation items; answers come from ``ctx.answerer`` or, by default, from
serving's own engine answering greedily (probes/answers.py): the prompt, the adapter (the
client's, else the federation's, else none) and the repetition controls a user gets. As in serving,
only passages at or above ``retrieval.relevance_floor`` reach the model; an item none of whose
passages does is not scored, as the serve-time grounding check leaves such an answer unscored.
"""

from __future__ import annotations

from pfi_rag.probes import missing, precision
from pfi_rag.probes.answers import model_answers, served_passages
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import support

GROUNDED_ANSWERS = 40  # most generated answers per client (generation is the suite's slowest step)
GROUNDED_FIRST = 8  # answered first; doubled until probes.groundedness_precision or decided


class GroundednessProbe(ClientProbe):
    name = "groundedness"
    order = 160
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
        if retriever is None:
            return self.skip(ctx, missing.no_index(client_id), client=client_id)
        qa = ctx.eval_items(client_id)[:GROUNDED_ANSWERS]
        if not qa:
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        cfg = ctx.config.probes
        rows: list[dict] = []
        served: set[str] = set()  # which adapter answered (client, global or base)

        def interval_of(n: int) -> precision.Interval:
            """Answers up to the first n items (those not answered yet) and the mean support's interval."""
            more = qa[len(rows) : n]
            hits = ctx.search_many(client_id, [q.query for q in more], ctx.config.retrieval.top_k)
            if ctx.answerer is not None:
                given = [served_passages(ctx, h) for h in hits]
                answers = [ctx.answerer(client_id, q.question, g) for q, g in zip(more, given, strict=True)]
            else:  # serving's engine answers them together (one decoding step serves many)
                results, given = model_answers(ctx, client_id, [q.question for q in more], hits)
                answers = [r.text for r in results]
                served.update(r.adapter.kind for r in results)
            for q, passages, answer in zip(more, given, answers, strict=True):
                score = support(answer, " ".join(p.text for p in passages)) if passages else None
                row = {"question": q.question, "answer": answer[:200], "support": score}
                rows.append(row | {"passages": len(passages)})
            # An answer without content words ("I don't know.") asserts nothing, and one given no
            # passage has nothing to be grounded in: both are left out, and a client with no
            # scored answer is grounded (1.0).
            scored = [r["support"] for r in rows if r["support"] is not None]
            if len(scored) < 2:
                estimate = scored[0] if scored else 1.0
                return precision.Interval(estimate, 0.0, 1.0, len(rows), "fewer than two scored answers")
            return precision.bounded_mean(scored)

        interval = precision.sample_until(
            interval_of,
            available=len(qa),
            first=GROUNDED_FIRST,
            half_width=cfg.groundedness_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        value = interval.estimate
        ungrounded = [r for r in rows if r["support"] is not None and r["support"] < self.threshold(ctx)]
        evidence = {
            "answers": len(rows),
            "without_passages": sum(r["passages"] == 0 for r in rows),  # every hit under the floor
            "adapter": sorted(served) if served else "answerer",
            "interval": [interval.low, interval.high],
            "ungrounded": ungrounded[:20],
        }
        return self.result(ctx, value, client=client_id, evidence=evidence)
