"""Membership inference on the client's adapter: can an attacker tell its training documents?

Loss-ratio attack with the base model as reference (Carlini et al. 2021, "LiRA"-style offline
calibration): score(x) = NLL_base(x) - NLL_adapter(x) per token. Members are the documents the
client trains on, non-members its held-out documents (data/corpus.py: a deterministic share of
its own store, never trained on, so of the same distribution by construction). A store-less
synthetic data root compares all its documents with ``clients/<id>/data/heldout.jsonl`` when
the client has one, else with the documents of a "twin" client the synthesiser builds from
another seed at the same size. The report gives ROC AUC and the TPR at 1% FPR; 0.5 AUC is chance.
"""

from __future__ import annotations

import random

from pfi_rag import layout
from pfi_rag.data.records import Document, read_jsonl
from pfi_rag.data.synth import synthesize_client
from pfi_rag.models.scoring import continuation_nll
from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import roc_auc, tpr_at_fpr

TWIN_SEED_OFFSET = 1_000_003  # the twin's seed: far from any seed a user picks for real data
MAX_TEXTS = 200  # per side: the AUC's standard error is already below 0.03 there
MAX_CHARS = 1200  # scored per document (~300 tokens): any window of a trained document is a member


def heldout_texts(ctx: ProbeContext, client_id: str) -> tuple[list[str], str]:
    path = layout.client_data_dir(ctx.data_root, client_id) / "heldout.jsonl"
    if path.is_file():
        return [d.text for d in read_jsonl(path, Document)], str(path.name)
    manifest = ctx.manifest()
    if manifest is None or client_id not in manifest.get("clients", {}):
        return [], "none"
    index = list(manifest["clients"]).index(client_id)
    twin = synthesize_client(int(manifest["seed"]) + TWIN_SEED_OFFSET, index, {})
    return [d.text for d in twin["records"]["documents"]], "synthetic twin"


# Tokens scored per forward pass: a pass of 1,024 tokens keeps both cores' matrix products busy
# (short audit canaries in batches of 4 ran at ~60% of that speed on two threads), and its logits
# over a 49k-token vocabulary stay at ~200 MB.
SCORE_BATCH_TOKENS = 1024


def per_token_nll(model, tokenizer, texts: list[str], *, max_tokens: int | None = None) -> list[float]:
    scored = continuation_nll(
        model,
        tokenizer,
        [""] * len(texts),
        texts,
        batch_size=len(texts) or 1,
        batch_tokens=SCORE_BATCH_TOKENS,
        max_tokens=max_tokens,
    )
    return [nll / n for nll, n in scored]


def members_and_nonmembers(ctx: ProbeContext, client_id: str) -> tuple[list[str], list[str], str]:
    corpus = ctx.corpus(client_id)
    if corpus.source == "store":
        return [d.text for d in corpus.train], [d.text for d in corpus.held_out], "held-out documents"
    nonmembers, source = heldout_texts(ctx, client_id)
    return [d.text for d in ctx.client_data(client_id).documents], nonmembers, source


class MembershipProbe(ClientProbe):
    name = "membership"
    order = 90
    mode = "membership inference"
    suites = ("privacy",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.CLIENT_DATA)
    metric = "auc"
    bounds = {"auc": (0.0, 1.0), "tpr_at_1pct_fpr": (0.0, 1.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        members, nonmembers, source = members_and_nonmembers(ctx, client_id)
        if not members or not nonmembers:
            return self.skip(ctx, missing.no_members(client_id), client=client_id)

        # A random order, so that the first n of each side (all the precision needs) are a sample.
        rng = random.Random(f"membership-{ctx.config.seed}-{client_id}")
        members, nonmembers = rng.sample(members, len(members)), rng.sample(nonmembers, len(nonmembers))
        # Training sees windows of max_seq_len tokens: a document's first window is a member.
        window = ctx.config.privacy.max_seq_len
        scored: dict[bool, list[float]] = {True: [], False: []}

        def scores(texts: list[str], member: bool, n: int) -> list[float]:
            done = scored[member]
            more = [t[:MAX_CHARS] for t in texts[len(done) : n]]
            if more:
                base = per_token_nll(ctx.base_model(), ctx.tokenizer, more, max_tokens=window)
                adapted = per_token_nll(ctx.client_model(client_id), ctx.tokenizer, more, max_tokens=window)
                done.extend(b - a for b, a in zip(base, adapted, strict=True))
            return done[:n]

        def interval_of(n: int) -> precision.Interval:
            return precision.auc(scores(members, True, n), scores(nonmembers, False, n))

        cfg = ctx.config.probes
        interval = precision.sample_until(
            interval_of,
            available=min(MAX_TEXTS, max(len(members), len(nonmembers))),
            first=cfg.membership_first_sample,
            half_width=cfg.membership_precision,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        member_scores = scores(members, True, interval.n)
        nonmember_scores = scores(nonmembers, False, interval.n)
        auc = roc_auc(member_scores, nonmember_scores)
        tpr = tpr_at_fpr(member_scores, nonmember_scores, 0.01)
        evidence = {
            "interval": [interval.low, interval.high],
            "scored_tokens_per_document": window,
            "members": len(member_scores),
            "nonmembers": len(nonmember_scores),
            "nonmember_source": source,
            "tpr_at_1pct_fpr": tpr,
        }
        return self.result(
            ctx, auc, client=client_id, evidence=evidence, metrics={"auc": auc, "tpr_at_1pct_fpr": tpr}
        )
