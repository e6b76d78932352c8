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

import re

import numpy as np

from pfi_rag.models.scoring import continuation_nll
from pfi_rag.probes import missing
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.metrics import exposure_from_samples

DIGITS = re.compile(r"\\d\{(\d+)\}")  # the only format the synthesiser plants: \d{n}
MAX_AUDIT_CANARIES = 8  # inserted audit canaries ranked (each against exposure_samples candidates)
CONTROL_CANARIES = 2  # controls ranked alongside, for the chance level


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
        per_canary = [
            canary_exposure(
                model, ctx.tokenizer, c, samples=ctx.config.probes.exposure_samples, seed=ctx.config.seed + i
            )
            for i, c in enumerate(canaries)
        ]
        value = max(c["exposure"] for c in per_canary)
        evidence = {"source": source, "canaries": per_canary}
        samples, seed = ctx.config.probes.exposure_samples, ctx.config.seed
        if controls:
            evidence["control_exposure"] = [
                canary_exposure(model, ctx.tokenizer, c, samples=samples, seed=seed + i)["exposure"]
                for i, c in enumerate(controls)
            ]
        return self.result(ctx, value, client=client_id, evidence=evidence)


def _as_planted(canary) -> dict:
    """An audit canary in the manifest's canary shape."""
    return {
        "prefix": canary.prefix,
        "secret": canary.secret,
        "format": f"\\d{{{len(canary.secret)}}}",
        "space_size": canary.space_size,
    }
