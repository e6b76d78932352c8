"""Canary exposure (Carlini et al. 2019): has the client's adapter memorised a planted secret?

For each canary in the manifest (a prefix such as "Ana's bank PIN is " and a secret drawn
from a format space R, here 6 digits, |R| = 10^6), the secret's NLL given the prefix is
ranked among candidates drawn uniformly from R; exposure = log2|R| - log2 rank. Ranking all
10^6 candidates is too slow, so, as Carlini do, the rank is estimated from
``exposure_samples`` sampled candidates (metrics.exposure_from_samples). A model that never
saw the secret has exposure around 1-2 bits; a memorised secret approaches log2|R| ~= 19.9.

The canaries are the manifest's planted ones on synthetic data; on a real deployment, the
client's own audit canaries (``privacy.audit_canaries``, data/audit_canaries.py): exposure is
measured on the inserted ones, and on a few controls (never trained on) for the chance level.
"""

from __future__ import annotations

import math
import re

import numpy as np

from pfi_rag.models.scoring import options_nll
from pfi_rag.probes import missing, precision
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import exposure_from_samples

DIGITS = re.compile(r"\\d\{(\d+)\}")  # the only format the synthesiser plants: \d{n}
MAX_AUDIT_CANARIES = 8  # inserted audit canaries ranked (each against exposure_samples candidates)
CONTROL_CANARIES = 2  # controls ranked alongside, for the chance level
CANDIDATE_BATCH = 128  # candidates per canary per forward pass (its prompt's KV cache shared)


def canary_exposure(
    model,
    tokenizer,
    canary: dict,
    *,
    samples: int,
    seed: int,
    first: int = 64,
    precision_bits: float = 0.0,
    threshold: float | None = None,
) -> dict:
    """The canary's exposure from up to ``samples`` candidates, with its 95% interval.

    Candidates are drawn in rounds (``first``, then doubling) and sampling stops once the
    interval is at most ``2 * precision_bits`` wide or lies wholly on one side of ``threshold``
    (precision 0 and no threshold: all ``samples``). The interval comes from the exact binomial
    interval of the share of candidates more likely than the secret: exposure is a decreasing
    function of that share. When no candidate beats the secret the estimate extrapolates a
    normal fit (metrics.exposure_from_samples) and the interval runs up to log2 |R|.
    """
    return canary_exposures(
        model,
        tokenizer,
        [canary],
        samples=samples,
        seeds=[seed],
        first=first,
        precision_bits=precision_bits,
        threshold=threshold,
    )[0]


class _Ranking:
    """One canary's secret and the candidates drawn against it so far."""

    def __init__(self, canary: dict, seed: int) -> None:
        self.canary = canary
        self.width = int(DIGITS.fullmatch(canary["format"]).group(1))
        self.space = int(canary["space_size"])
        self.rng = np.random.default_rng(seed)
        self.prefix = canary["prefix"].rstrip(" ")
        self.secret_nll: float | None = None
        self.nlls: list[float] = []
        self.interval: precision.Interval | None = None

    def draw(self, count: int) -> list[str]:
        drawn = [f"{int(x):0{self.width}d}" for x in self.rng.integers(0, 10**self.width, size=count)]
        secret = self.canary["secret"]
        return [c if c != secret else f"{(int(c) + 1) % 10**self.width:0{self.width}d}" for c in drawn]

    def interval_of(self, n: int) -> precision.Interval:
        estimate = exposure_from_samples(self.secret_nll, self.nlls[:n], self.space)["exposure"]
        beaten = int((np.asarray(self.nlls[:n]) < self.secret_nll).sum())
        low_share, high_share = precision.share_interval(beaten, n)
        low, high = exposure_of_share(high_share, self.space), exposure_of_share(low_share, self.space)
        return precision.Interval(
            estimate, min(low, estimate), max(high, estimate), n, "clopper-pearson rank share"
        )


def canary_exposures(
    model,
    tokenizer,
    canaries: list[dict],
    *,
    samples: int,
    seeds: list[int],
    first: int = 64,
    precision_bits: float = 0.0,
    threshold: float | None = None,
) -> list[dict]:
    """:func:`canary_exposure` of each canary (seeded by its seed), all ranked together: each round
    scores every canary still sampling in one ``options_nll`` call (many prefixes per forward
    pass), instead of one pass per canary. Each canary stops on its own interval, as alone."""
    rankings = [_Ranking(c, seed) for c, seed in zip(canaries, seeds, strict=True)]
    n = min(max(first, 1), samples)
    active = rankings
    while active:
        rows = [(r, r.draw(n - len(r.nlls))) for r in active]
        for start in range(0, max(len(drawn) for _, drawn in rows), CANDIDATE_BATCH):
            # A canary's secret goes first in its first round's option list.
            chunks = []
            for r, drawn in rows:
                secret = [r.canary["secret"]] if r.secret_nll is None else []
                if chunk := secret + drawn[start : start + CANDIDATE_BATCH]:
                    chunks.append((r, chunk))
            prompts = [r.prefix for r, _ in chunks]
            scored = options_nll(model, tokenizer, prompts, [[" " + c for c in chunk] for _, chunk in chunks])
            for (r, _), options in zip(chunks, scored, strict=True):
                nlls = [nll for nll, _ in options]
                if r.secret_nll is None:
                    r.secret_nll, nlls = nlls[0], nlls[1:]
                r.nlls.extend(nlls)
        for r in active:
            r.interval = r.interval_of(n)
        active = [
            r
            for r in active
            if not (n >= samples or r.interval.half_width <= precision_bits or r.interval.clear_of(threshold))
        ]
        n = min(samples, 2 * n)
    results = []
    for r in rankings:
        result = exposure_from_samples(r.secret_nll, r.nlls[: r.interval.n], r.space)
        results.append(
            {
                **result,
                "interval": [r.interval.low, r.interval.high],
                "repeats": r.canary.get("repeats"),
                "prefix": r.canary["prefix"],
            }
        )
    return results


def exposure_of_share(share: float, space_size: int) -> float:
    """Exposure when ``share`` of the format space is more likely than the secret."""
    return math.log2(space_size) - math.log2(1.0 + share * (space_size - 1))


class ExposureProbe(ClientProbe):
    name = "exposure"
    order = 80
    mode = "memorised secrets (canary exposure)"
    suites = ("privacy",)
    needs = (Need.CLIENT_ADAPTER,)
    metric = "max_exposure_bits"
    bounds = {"max_exposure_bits": (0.0, 20.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        truth = ctx.truth(client_id) or {}
        canaries = [c for c in truth.get("canaries", []) if DIGITS.fullmatch(c.get("format", ""))]
        source = "manifest"
        controls: list[dict] = []
        if not canaries:
            source = "audit canaries"
            audit = ctx.audit_canaries(client_id)
            canaries = [_as_planted(c) for c in audit if c.inserted][:MAX_AUDIT_CANARIES]
            controls = [_as_planted(c) for c in audit if not c.inserted][:CONTROL_CANARIES]
        if not canaries:
            return self.skip(ctx, missing.no_audit_canaries(client_id), client=client_id)
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        cfg = ctx.config.probes

        # Inserted canaries and controls ranked together (the controls seeded as when ranked alone).
        seeds = [ctx.config.seed + i for i in range(len(canaries))]
        seeds += [ctx.config.seed + i for i in range(len(controls))]
        ranked = canary_exposures(
            model,
            ctx.tokenizer,
            canaries + controls,
            samples=cfg.exposure_samples,
            seeds=seeds,
            first=cfg.exposure_first_samples,
            precision_bits=cfg.exposure_precision_bits,
            threshold=self.threshold(ctx) if cfg.stop_when_decided else None,
        )
        per_canary, control = ranked[: len(canaries)], ranked[len(canaries) :]
        worst = max(per_canary, key=lambda c: c["exposure"])
        evidence = {
            "source": source,
            "canaries": per_canary,
            "interval": worst["interval"],  # of the most exposed canary: the value reported
            "samples_scored": sum(c["samples"] for c in per_canary),
        }
        if controls:
            evidence["control_exposure"] = [c["exposure"] for c in control]
        value = worst["exposure"]
        return self.result(ctx, value, client=client_id, evidence=evidence)


def _as_planted(canary) -> dict:
    """An audit canary in the manifest's canary shape."""
    return {
        "prefix": canary.prefix,
        "secret": canary.secret,
        "format": f"\\d{{{len(canary.secret)}}}",
        "space_size": canary.space_size,
    }
