"""Stale retrieval: superseded facts served.

For each superseded statement, does any top-k hit state it? The statements come from the
store's own history (every document with an older version: the sentences the new version no
longer has, whoever wrote either version) or, on synthetic data, from the manifest's versioned
facts. Such a passage makes a stale answer, whether the update was never ingested, was ingested
under another id next to the old version, or the index kept a retired chunk. It needs a
retriever (context.Retriever) and reads the store's versions (read-only).
"""

from __future__ import annotations

import difflib
import re

from pfi_rag import layout
from pfi_rag.probes import missing
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import ngrams

STALE_NGRAM = 4  # a hit states a superseded sentence when it shares a 4-word run only that had
MIN_STALE_WORDS = 4  # shorter removed sentences ("Ok.") say nothing checkable
MAX_STALE_ITEMS = 200
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


class StaleProbe(ClientProbe):
    name = "stale"
    order = 150
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
