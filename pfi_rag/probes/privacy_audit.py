"""The empirical privacy audit of one client: a lower bound on the epsilon its training achieved.

Reads the client's audit canaries (data/audit_canaries.py: a random half inserted into its DP
training, the rest controls), scores each by how much the adapter lowers its per-token loss
below the base model's, and runs the one-run audit (probes/audit.py) on those scores. The
ledger's epsilon is the line: a correct DP implementation keeps the audited lower bound at or
below it (except with probability beta = 5%), so a bound above it means the noise, the clipping
or the accounting is broken. The value is the bound minus the ledger's epsilon; the threshold is
0 and is not a tuning knob (calibrate-probes leaves it alone).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pfi_rag.data.audit_canaries import AuditCanary
from pfi_rag.probes import missing
from pfi_rag.probes.audit import AuditResult, audit, guess_counts
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.budget import ledger_spends
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.membership import per_token_nll

logger = logging.getLogger(__name__)


def canary_scores(base, adapted, tokenizer, canaries: Sequence[AuditCanary]) -> np.ndarray:
    """Per canary, NLL_base - NLL_adapter per token of its whole text: higher = more memorised."""
    texts = [c.text for c in canaries]
    before = np.array(per_token_nll(base, tokenizer, texts))
    return before - np.array(per_token_nll(adapted, tokenizer, texts))


def audit_canaries(
    scores: Sequence[float], canaries: Sequence[AuditCanary], *, guess_share: float, delta: float
) -> AuditResult:
    guessed_in, guessed_out = guess_counts(len(canaries), guess_share)
    return audit(
        scores,
        [c.inserted for c in canaries],
        guessed_in=guessed_in,
        guessed_out=guessed_out,
        delta=delta,
    )


def ledger_epsilon(ledger: dict) -> float | None:
    spends = ledger_spends(ledger)
    if not spends:
        return None
    if ledger.get("epsilon_spent") is not None:
        return float(ledger["epsilon_spent"])
    last = spends[-1].get("epsilon_after")
    return None if last is None else float(last)


class AuditProbe(ClientProbe):
    name = "audit"
    order = 100
    mode = "DP guarantee broken (one-run privacy audit)"
    suites = ("privacy",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.LEDGER)
    metric = "epsilon_excess"
    bounds = {"epsilon_excess": (-20.0, 20.0), "epsilon_lower_bound": (0.0, 20.0)}

    def threshold(self, ctx: ProbeContext) -> float:
        return 0.0  # the DP guarantee itself: an audited bound above the ledger's epsilon is a bug

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        canaries = ctx.audit_canaries(client_id)
        if not canaries:
            return self.skip(ctx, missing.no_audit_canaries(client_id), client=client_id)
        model = ctx.client_model(client_id)
        if model is None:
            return self.skip(ctx, missing.no_adapter(client_id), client=client_id)
        ledger = ctx.ledger(client_id) or {}
        epsilon = ledger_epsilon(ledger)
        if epsilon is None:
            return self.skip(ctx, missing.no_ledger(client_id), client=client_id)
        delta = float(ledger.get("delta") or ctx.config.privacy.delta)
        scores = canary_scores(ctx.base_model(), ctx.client_model(client_id), ctx.tokenizer, canaries)
        share = ctx.config.probes.audit_guess_share
        result = audit_canaries(scores, canaries, guess_share=share, delta=delta)
        excess = result.epsilon_lower_bound - epsilon
        inserted = np.array([c.inserted for c in canaries])
        evidence = {
            **result.as_dict(),
            "ledger_epsilon": epsilon,
            "mean_score_inserted": float(scores[inserted].mean()) if inserted.any() else None,
            "mean_score_controls": float(scores[~inserted].mean()) if (~inserted).any() else None,
        }
        if excess > 0:
            evidence["alarm"] = (
                f"DP bug: the audit proves epsilon >= {result.epsilon_lower_bound:.3f} (95% confidence) "
                f"but the ledger accounts {epsilon:.3f}; noise, clipping or accounting is broken"
            )
            logger.error("client %s: %s", client_id, evidence["alarm"])
        metrics = {"epsilon_excess": excess, "epsilon_lower_bound": result.epsilon_lower_bound}
        return self.result(ctx, excess, client=client_id, evidence=evidence, metrics=metrics)
