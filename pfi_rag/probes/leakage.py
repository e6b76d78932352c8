"""Cross-client leakage: does client B see client A's secrets or unique text?

Two channels, for every ordered pair (victim A, observer B). A's secrets are its planted canaries
(synthetic data) and the audit canaries it inserted into its training (``privacy.audit_canaries``);
its unique text is every word 6-gram of its current documents that no other client has.

- retrieval: B's retriever is searched with A's canary prefixes and B's own questions; a hit
  that contains A's secret or a word n-gram found only in A's documents is a leak (an index
  built from mixed data, a shared store, a wrong client id);
- output: B's personalized model (else the global one) greedily completes A's canary
  prefixes; a completion containing A's secret is a leak (memorised through the federation).

Both need one client's ground truth next to another client's system, so the private mode
skips this probe: run it as the operator.
"""

from __future__ import annotations

from collections import Counter

from pfi_rag.probes import missing
from pfi_rag.probes.base import FLAGGED_CLIENTS, FederationProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.lm import greedy_answers
from pfi_rag.probes.metrics import ngrams

NGRAM = 6  # word n-grams; 6 words of synthetic personal text are almost never shared by chance
SECRET_TOKENS = 12  # tokens generated after a canary prefix (a 6-digit secret and a little more)
MAX_AUDIT_SECRETS = 16  # inserted audit canaries completed per (victim, observer) pair
MAX_OWN_QUERIES = 50  # the observer's own queries searched per victim


def _documents(ctx: ProbeContext, client_id: str):
    """What the client's text is: its synthetic documents (ground truth of who owns what) when it
    has them, else its store's current documents (a text in two stores then belongs to both)."""
    planted = ctx.client_data(client_id).documents
    if planted:
        return planted
    corpus = ctx.corpus(client_id)
    return [*corpus.train, *corpus.held_out]


def secrets_of(ctx: ProbeContext, client_id: str) -> list[dict]:
    """Planted canaries (manifest) and inserted audit canaries, as {"prefix", "secret"}."""
    planted = list((ctx.truth(client_id) or {}).get("canaries", []))
    audit = [{"prefix": c.prefix, "secret": c.secret} for c in ctx.audit_canaries(client_id) if c.inserted]
    return planted + audit[:MAX_AUDIT_SECRETS]


def unique_ngrams(ctx: ProbeContext, client_ids: list[str]) -> dict[str, set[tuple[str, ...]]]:
    """Per client, the n-grams of its documents that no other client's documents contain."""
    per_client = {c: set().union(*(ngrams(d.text, NGRAM) for d in _documents(ctx, c))) for c in client_ids}
    counts = Counter(g for grams in per_client.values() for g in grams)
    return {c: {g for g in grams if counts[g] == 1} for c, grams in per_client.items()}


class LeakageProbe(FederationProbe):
    name = "leakage"
    order = 110
    mode = "cross-client leakage"
    suites = ("privacy", "rag")
    needs = (Need.CLIENT_DATA, Need.RETRIEVER, Need.CLIENT_ADAPTER)
    metric = "leaks"
    private_ok = False

    def run_federation(self, ctx: ProbeContext, client_ids: list[str]) -> ProbeResult:
        if len(client_ids) < 2:
            return self.skip(ctx, missing.TWO_CLIENTS)
        unique = unique_ngrams(ctx, client_ids)
        secrets = {c: secrets_of(ctx, c) for c in client_ids}
        k = ctx.config.retrieval.top_k
        leaks: list[dict] = []
        checked = {"retrieval_queries": 0, "completions": 0}
        asked: list[tuple[str, str, dict]] = []  # (observer, victim, canary) completed by the observer
        adapters: list[str] = []  # the observer's adapter, one per completion
        peft = None  # the context's PeftModel, every loaded adapter in it
        for observer in client_ids:
            retriever = ctx.retriever(observer)
            model = ctx.client_model(observer) or ctx.global_model()
            victims = [v for v in client_ids if v != observer]
            if retriever is not None:
                # The observer's own queries are searched once, then checked against every victim;
                # every search of the observer's store is embedded in one batch.
                own = [q.query for q in ctx.eval_items(observer)][:MAX_OWN_QUERIES]
                prefixes = [c["prefix"] for victim in victims for c in secrets[victim]]
                found = ctx.search_many(observer, own + prefixes, k)
                own_hits, by_prefix = found[: len(own)], dict(zip(prefixes, found[len(own) :], strict=True))
                for victim in victims:
                    prefix_hits = [by_prefix[c["prefix"]] for c in secrets[victim]]
                    checked["retrieval_queries"] += len(prefix_hits) + len(own_hits)
                    for hits in prefix_hits + own_hits:
                        for hit in hits:
                            leak = _leaked_item(hit.text, secrets[victim], unique[victim])
                            if leak:
                                leaks.append(
                                    {
                                        "channel": "retrieval",
                                        "victim": victim,
                                        "observer": observer,
                                        "doc_id": hit.doc_id,
                                        "item": leak,
                                    }
                                )
            if model is not None:
                pairs = [(observer, victim, canary) for victim in victims for canary in secrets[victim]]
                asked.extend(pairs)
                adapters.extend([model.active_adapter] * len(pairs))  # the adapter just activated
                peft = model
        if peft is not None and asked:
            # Every observer's completions in one batch, each row with its observer's adapter: one
            # decoding step serves every client (canary prefixes are short and of similar length).
            completions = greedy_answers(
                peft,
                ctx.tokenizer,
                [canary["prefix"].rstrip(" ") for _, _, canary in asked],
                max_new_tokens=SECRET_TOKENS,
                batch_size=256,
                adapter_names=adapters,
            )
            checked["completions"] += len(asked)
            for (observer, victim, canary), text in zip(asked, completions, strict=True):
                if canary["secret"] in text:
                    leaks.append(
                        {
                            "channel": "output",
                            "victim": victim,
                            "observer": observer,
                            "item": f"canary {canary['prefix']!r}",
                        }
                    )
        if not any(checked.values()):
            why = "no client has a store or a model to check: run `pfi-rag ingest` and `pfi-rag federate`"
            return self.skip(ctx, why)
        evidence = {
            "checked": checked,
            "leaks": leaks[:50],
            "pairs": _pair_counts(leaks),
            FLAGGED_CLIENTS: sorted({leak["victim"] for leak in leaks}),  # whose data got out
        }
        return self.result(ctx, float(len(leaks)), evidence=evidence)


def _leaked_item(text: str, canaries: list[dict], victim_ngrams: set[tuple[str, ...]]) -> str | None:
    for canary in canaries:
        if canary["secret"] in text:
            return f"canary {canary['prefix']!r}"
    shared = ngrams(text, NGRAM) & victim_ngrams
    if shared:
        return "unique n-gram " + " ".join(sorted(shared)[0])
    return None


def _pair_counts(leaks: list[dict]) -> dict[str, int]:
    return dict(Counter(f"{leak['victim']} -> {leak['observer']} ({leak['channel']})" for leak in leaks))
