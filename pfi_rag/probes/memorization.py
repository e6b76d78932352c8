"""Canary exposure (Carlini et al. 2019): has the client's adapter memorised a planted secret?

For each canary in the manifest (a prefix such as "Ana's bank PIN is " and a secret drawn
from a format space R, here 6 digits, |R| = 10^6), the secret's NLL given the prefix is
ranked among candidates drawn uniformly from R; exposure = log2|R| - log2 rank. Ranking all
10^6 candidates is too slow, so, as Carlini do, the rank is estimated from
``exposure_samples`` sampled candidates (metrics.exposure_from_samples). A model that never
saw the secret has exposure around 1-2 bits; a memorised secret approaches log2|R| ~= 19.9.
"""

from __future__ import annotations

import re

import numpy as np

from pfi_rag.models.scoring import continuation_nll
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import exposure_from_samples

DIGITS = re.compile(r"\\d\{(\d+)\}")  # the only format the synthesiser plants: \d{n}


def canary_exposure(model, tokenizer, canary: dict, *, samples: int, seed: int) -> dict:
    width = int(DIGITS.fullmatch(canary["format"]).group(1))
    rng = np.random.default_rng(seed)
    candidates = [f"{int(x):0{width}d}" for x in rng.integers(0, 10**width, size=samples)]
    candidates = [c for c in candidates if c != canary["secret"]]
    prefix = canary["prefix"].rstrip(" ")
    scored = continuation_nll(
        model,
        tokenizer,
        [prefix] * (len(candidates) + 1),
        [" " + canary["secret"]] + [" " + c for c in candidates],
    )
    nlls = [nll for nll, _ in scored]
    result = exposure_from_samples(nlls[0], nlls[1:], int(canary["space_size"]))
    return {**result, "repeats": canary.get("repeats"), "prefix": canary["prefix"]}


class ExposureProbe(ClientProbe):
    name = "exposure"
    mode = "memorised secrets (canary exposure)"
    suites = ("privacy",)
    needs = (Need.CLIENT_ADAPTER, Need.MANIFEST)
    metric = "max_exposure_bits"
    bounds = {"max_exposure_bits": (0.0, 20.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        truth = ctx.truth(client_id) or {}
        canaries = [c for c in truth.get("canaries", []) if DIGITS.fullmatch(c.get("format", ""))]
        if not canaries:
            return self.skip(ctx, "no planted canaries for this client (manifest)", client=client_id)
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, "client has no adapter", client=client_id)
        per_canary = [
            canary_exposure(
                model, ctx.tokenizer, c, samples=ctx.config.probes.exposure_samples, seed=ctx.config.seed + i
            )
            for i, c in enumerate(canaries)
        ]
        value = max(c["exposure"] for c in per_canary)
        return self.result(ctx, value, client=client_id, evidence={"canaries": per_canary})
