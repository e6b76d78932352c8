"""Retrieval failures: known facts not found, superseded facts served, answers not grounded.

- hit rate: for each evaluation item (a held-out question, or a cloze item from a held-out
  document: probes/items.py), is the document that states its answer among the top-k hits
  (``retrieval.top_k``)?
- stale rate: for each superseded statement, does any top-k hit state it? The statements come
  from the store's own history (every document with an older version: the sentences the new
  version no longer has, whoever wrote either version) or, on synthetic data, from the
  manifest's versioned facts. Such a passage makes a stale answer, whether the update was
  never ingested, was ingested under another id next to the old version, or the index kept a
  retired chunk.
- groundedness: the share of an answer's content words found in the retrieved context,
  averaged over the evaluation items; answers come from ``ctx.answerer`` or, by default,
  from the client's model generating greedily from the context.

They need a retriever with ``search(query, k) -> hits`` (context.Retriever); the stale rate
also reads the store's versions (read-only).
"""

from __future__ import annotations

import difflib
import re

from pfi_rag import layout
from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext, SearchHit
from pfi_rag.probes.lm import chat_prompt, greedy_answer, greedy_answers
from pfi_rag.probes.metrics import ngrams, support

STALE_NGRAM = 4  # a hit states a superseded sentence when it shares a 4-word run only that had
MIN_STALE_WORDS = 4  # shorter removed sentences ("Ok.") say nothing checkable
MAX_STALE_ITEMS = 200
GROUNDED_ANSWERS = 40  # most generated answers per client (generation is the suite's slowest step)
GROUNDED_FIRST = 8  # answered first; doubled until probes.groundedness_precision or decided
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


class RetrievalHitProbe(ClientProbe):
    name = "retrieval_hit"
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


class StaleProbe(ClientProbe):
    name = "stale"
    mode = "stale retrieval (superseded facts)"
    suites = ("rag",)
    needs = (Need.RETRIEVER,)
    metric = "stale_rate"
    bounds = {"stale_rate": (0.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        retriever = ctx.retriever(client_id)
        if retriever is None:
            return self.skip(ctx, missing.no_index(client_id), client=client_id)
        versioned = (ctx.truth(client_id) or {}).get("versioned", [])
        if not versioned:
            return self.from_history(ctx, client_id, retriever)
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
        evidence = {"source": "manifest", "facts": len(versioned), "stale": stale}
        return self.result(ctx, rate, client=client_id, evidence=evidence)

    def from_history(self, ctx: ProbeContext, client_id: str, retriever) -> ProbeResult:
        """Stale rate over the sentences superseded versions stated and current ones dropped."""
        path = layout.client_docstore_file(ctx.data_root, client_id)
        if not path.is_file():
            return self.skip(ctx, missing.no_index(client_id), client=client_id)
        from pfi_rag.retriever.docstore import read_superseded_versions

        corpus = ctx.corpus(client_id)
        current = [d.text for d in [*corpus.train, *corpus.held_out]]
        statements = superseded_statements(read_superseded_versions(path), current)[:MAX_STALE_ITEMS]
        evidence: dict = {"source": "store history", "documents_with_history": 0, "statements": 0}
        if not statements:
            # Nothing superseded: nothing can be served stale. A measured zero, not a skip.
            evidence["note"] = "no superseded version in the store: nothing can be served stale"
            return self.result(ctx, 0.0, client=client_id, evidence=evidence)
        k = ctx.config.retrieval.top_k
        stale = []
        for item in statements:
            hits = retriever.search(item["query"], k)
            served = [h.doc_id for h in hits if ngrams(h.text, STALE_NGRAM) & item["old_ngrams"]]
            if served:
                stale.append({"doc_id": item["doc_id"], "superseded": item["old"][:200], "served_by": served})
        evidence.update(
            documents_with_history=len({s["doc_id"] for s in statements}),
            statements=len(statements),
            stale=stale[:20],
        )
        return self.result(ctx, len(stale) / len(statements), client=client_id, evidence=evidence)


def sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in _SENTENCE.split(text) if s.strip()]


def superseded_statements(versions: list[dict], current_texts: list[str]) -> list[dict]:
    """Per document with history, each sentence of an older version that its current version
    replaced or removed: what a user asking about it now must not be served.

    ``versions``: rows ``{doc_id, version, text, current}`` (docstore.read_superseded_versions).
    The query is the replacing sentence when there is one (what the user now asks about), else
    the removed sentence itself; a hit is stale when it shares a word 4-gram that only the old
    sentence has: no current document of the client (``current_texts``) states it, so only a
    superseded version can have put it in the hit.
    """
    current_grams = set().union(*(ngrams(t, STALE_NGRAM) for t in current_texts))
    by_doc: dict[str, list[dict]] = {}
    for row in versions:
        by_doc.setdefault(row["doc_id"], []).append(row)
    out = []
    for doc_id, rows in sorted(by_doc.items()):
        current = next((r for r in rows if r["current"]), None)
        if current is None:
            continue
        new = sentences(current["text"])
        own_grams = ngrams(current["text"], STALE_NGRAM)
        for old_row in sorted((r for r in rows if not r["current"]), key=lambda r: r["version"]):
            old = sentences(old_row["text"])
            matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag not in ("replace", "delete"):
                    continue
                replacement = " ".join(new[j1:j2])
                for sentence in old[i1:i2]:
                    only_old = ngrams(sentence, STALE_NGRAM) - current_grams - own_grams
                    if len(sentence.split()) < MIN_STALE_WORDS or not only_old:
                        continue
                    out.append(
                        {
                            "doc_id": doc_id,
                            "old": sentence,
                            "query": replacement or sentence,
                            "old_ngrams": only_old,
                        }
                    )
    return out


def answer_prompt(ctx: ProbeContext, question: str, hits: list[SearchHit]) -> str:
    notes = "\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, start=1))
    return chat_prompt(
        ctx.tokenizer, f"{ctx.config.serving.system_prompt}\n\nNotes:\n{notes}\n\nQuestion: {question}"
    )


def model_answerer(ctx: ProbeContext):
    """The default answerer: the client's model (else the base) answers from the hits, greedily."""

    def answer(client_id: str, question: str, hits: list[SearchHit]) -> str:
        model = ctx.client_model(client_id) or ctx.base_model()
        prompt = answer_prompt(ctx, question, hits)
        return greedy_answer(model, ctx.tokenizer, prompt, max_new_tokens=ctx.config.probes.answer_tokens)

    return answer


def model_answers(
    ctx: ProbeContext, client_id: str, questions: list[str], hits: list[list[SearchHit]]
) -> list[str]:
    """What ``model_answerer`` answers to each question, generated in batches."""
    model = ctx.client_model(client_id) or ctx.base_model()
    prompts = [answer_prompt(ctx, q, h) for q, h in zip(questions, hits, strict=True)]
    return greedy_answers(model, ctx.tokenizer, prompts, max_new_tokens=ctx.config.probes.answer_tokens)


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
        if retriever is None:
            return self.skip(ctx, missing.no_index(client_id), client=client_id)
        qa = ctx.eval_items(client_id)[:GROUNDED_ANSWERS]
        if not qa:
            return self.skip(ctx, missing.no_items(client_id), client=client_id)
        cfg = ctx.config.probes
        rows: list[dict] = []

        def interval_of(n: int) -> precision.Interval:
            """Answers up to the first n items (those not answered yet) and the mean support's interval."""
            more = qa[len(rows) : n]
            hits = [retriever.search(q.query, ctx.config.retrieval.top_k) for q in more]
            if ctx.answerer is not None:
                answers = [ctx.answerer(client_id, q.question, h) for q, h in zip(more, hits, strict=True)]
            else:  # the client's model answers them in batches (one decoding step serves many)
                answers = model_answers(ctx, client_id, [q.question for q in more], hits)
            for q, h, answer in zip(more, hits, answers, strict=True):
                score = support(answer, " ".join(x.text for x in h))
                rows.append({"question": q.question, "answer": answer[:200], "support": score})
            # An answer without content words ("I don't know.") asserts nothing: it is left out,
            # and a client whose answers all assert nothing is grounded (1.0).
            scored = [r["support"] for r in rows if r["support"] is not None]
            if len(scored) < 2:
                estimate = scored[0] if scored else 1.0
                return precision.Interval(estimate, 0.0, 1.0, len(rows), "fewer than two scored answers")
            interval = precision.mean(scored)
            return precision.Interval(
                interval.estimate,
                max(0.0, interval.low),
                min(1.0, interval.high),
                interval.n,
                interval.method,
            )

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
            "interval": [interval.low, interval.high],
            "ungrounded": ungrounded[:20],
        }
        return self.result(ctx, value, client=client_id, evidence=evidence)
