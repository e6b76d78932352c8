"""Budget audit: is the privacy the ledger claims real, within budget, and carried across rounds?

Reads ``clients/<id>/privacy.json`` (written by ``pfi_rag.privacy``) defensively, as a JSON
object with these fields (any missing one disables only the checks that need it)::

    {"epsilon_max": float, "delta": float,
     "spends": [{"when": str, "noise_multiplier": float (or "sigma"), "sample_rate": float,
                 "steps": int, "epsilon_after": float}, ...]}

(``history`` / ``entries`` are accepted for ``spends``.) Violations, each named in the evidence:

- an adapter exists but there is no ledger (trained outside the accountant);
- a budget above the configured ``privacy.epsilon_max``, or the spent epsilon above the budget;
- a spend with noise 0 or none recorded ("privacy theatre": DP configured, not applied), or a
  noise different from the configured ``privacy.noise_multiplier``;
- epsilon_after falling between spends, or below what an RDP accountant recomputes from all
  the spends together (a budget restarted every round), or fewer spends than the federation
  rounds the client took part in (rounds not accounted).
"""

from __future__ import annotations

from typing import Any

from pfi_rag.models.adapters import client_adapter_dir
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext, has_adapter

RECOMPUTE_TOLERANCE = 0.05  # relative: accountants differ slightly (RDP orders, PRV vs RDP)


def ledger_spends(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("spends", "history", "entries"):
        if isinstance(ledger.get(key), list):
            return [s for s in ledger[key] if isinstance(s, dict)]
    return []


def spend_sigma(spend: dict[str, Any]) -> float | None:
    value = spend.get("noise_multiplier", spend.get("sigma"))
    return None if value is None else float(value)


def rdp_epsilon(spends: list[dict[str, Any]], delta: float) -> float | None:
    """Epsilon of all spends composed (Opacus RDP accountant); None if a spend lacks a field."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for spend in spends:
        sigma = spend_sigma(spend)
        if sigma is None or sigma <= 0 or spend.get("sample_rate") is None or spend.get("steps") is None:
            return None
        accountant.history.append((sigma, float(spend["sample_rate"]), int(spend["steps"])))
    return float(accountant.get_epsilon(delta)) if spends else None


class BudgetProbe(ClientProbe):
    name = "budget"
    mode = "privacy theatre (budget audit)"
    suites = ("privacy",)
    needs = (Need.LEDGER, Need.HISTORY)
    metric = "violations"
    bounds = {"violations": (0.0, 10.0), "epsilon_spent_ratio": (0.0, 2.0)}

    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult:
        ledger = ctx.ledger(client_id)
        trained = has_adapter(client_adapter_dir(ctx.data_root, client_id))
        if ledger is None:
            if not trained:
                return self.skip(ctx, "client has neither an adapter nor a privacy ledger", client=client_id)
            violations = ["an adapter exists but the client has no privacy ledger (privacy.json)"]
            return self.result(
                ctx, 1.0, client=client_id, evidence={"violations": violations}, metrics={"violations": 1.0}
            )
        privacy = ctx.config.privacy
        violations: list[str] = []
        spends = ledger_spends(ledger)
        budget = float(ledger.get("epsilon_max", privacy.epsilon_max))
        if budget > privacy.epsilon_max:
            violations.append(
                f"ledger budget {budget:g} exceeds the configured epsilon_max {privacy.epsilon_max:g}"
            )
        budget = min(budget, privacy.epsilon_max)
        afters = [float(s["epsilon_after"]) for s in spends if s.get("epsilon_after") is not None]
        spent = afters[-1] if afters else float(ledger.get("epsilon_spent", ledger.get("epsilon", 0.0)))
        if spent > budget:
            violations.append(f"epsilon spent {spent:.3f} exceeds the budget {budget:g}")
        for number, spend in enumerate(spends, start=1):
            sigma = spend_sigma(spend)
            if sigma is None or sigma <= 0:
                violations.append(f"spend {number}: no noise applied (noise_multiplier={sigma})")
            elif (
                spend.get("kind", "dp-sgd") == "dp-sgd"
                and privacy.noise_multiplier is not None
                and abs(sigma - privacy.noise_multiplier) > 1e-6
            ):
                violations.append(
                    f"spend {number}: noise {sigma:g} is not the configured {privacy.noise_multiplier:g}"
                )
        for number, (a, b) in enumerate(zip(afters, afters[1:], strict=False), start=2):
            if b < a:
                violations.append(
                    f"spend {number}: epsilon_after fell from {a:.3f} to {b:.3f} (budget reset)"
                )
        delta = ledger.get("delta", privacy.delta)
        recomputed = rdp_epsilon(spends, float(delta)) if delta else None
        if recomputed is not None and spent < recomputed * (1 - RECOMPUTE_TOLERANCE):
            violations.append(
                f"ledger says epsilon {spent:.3f} but its {len(spends)} spends compose to {recomputed:.3f} "
                "(epsilon not carried across rounds)"
            )
        rounds = [r.number for r in ctx.history() if client_id in r.updates]
        if len(rounds) > len(spends):
            violations.append(
                f"took part in {len(rounds)} federation rounds but the ledger has {len(spends)} spends"
            )
        evidence = {
            "violations": violations,
            "epsilon_spent": spent,
            "epsilon_max": budget,
            "epsilon_recomputed": recomputed,
            "delta": delta,
            "spends": len(spends),
            "rounds_participated": rounds,
        }
        metrics = {"violations": float(len(violations)), "epsilon_spent_ratio": spent / budget}
        return self.result(ctx, float(len(violations)), client=client_id, evidence=evidence, metrics=metrics)
