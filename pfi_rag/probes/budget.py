"""Budget audit: is the privacy the ledger claims real, within its budget, and carried across rounds?

Reads ``clients/<id>/privacy.json`` (written only by ``pfi_rag.privacy``) defensively, as a JSON
object with these fields (any missing one disables only the checks that need it)::

    {"epsilon_max": float, "delta": float, "accountant": {"mechanism": "pld" | "rdp"},
     "budget": [{"at", "epsilon_max", "reason", "digest"}, ...],
     "spends": [{"kind": str, "noise_multiplier": float (or "sigma"), "sample_rate": float,
                 "steps": int, "epsilon_after": float, "digest": str}, ...]}

(``history`` / ``entries`` are accepted for ``spends``.) Violations, each named in the evidence:

- an adapter exists but there is no ledger (trained outside the accountant), or the adapter has
  absorbed more epsilon than its ledger records (the ledger was deleted or replaced);
- any change of the budget after the ledger was created (``pfi-rag privacy set-budget``), with
  its reason; the spent epsilon above the budget;
- an edited history: a spend or budget entry whose chained digest does not match;
- a spend with noise 0 or none recorded ("privacy theatre": DP configured, not applied), or a
  DP-SGD noise different from the configured ``privacy.noise_multiplier``;
- epsilon_after falling between spends, or below what the ledger's accountant recomputes from all
  the spends together (a budget restarted every round), or fewer DP-SGD spends than the
  federation rounds the client took part in (rounds not accounted).

Every kind of spend counts: DP-SGD steps, round-metric releases and private probe releases.
"""

from __future__ import annotations

from typing import Any

from pfi_rag.layout import client_adapter_dir
from pfi_rag.models.adapters import read_adapter_info
from pfi_rag.privacy.accounting import MECHANISMS, epsilon_of
from pfi_rag.privacy.ledger import verify_chain
from pfi_rag.probes.base import ClientProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext, has_adapter

RECOMPUTE_TOLERANCE = 0.05  # relative: room for a ledger kept by an older accountant version


def ledger_spends(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("spends", "history", "entries"):
        if isinstance(ledger.get(key), list):
            return [s for s in ledger[key] if isinstance(s, dict)]
    return []


def spend_sigma(spend: dict[str, Any]) -> float | None:
    value = spend.get("noise_multiplier", spend.get("sigma"))
    return None if value is None else float(value)


def recomputed_epsilon(spends: list[dict[str, Any]], delta: float, mechanism: str) -> float | None:
    """Epsilon of all spends composed by ``mechanism``; None if a spend lacks a field."""
    history = []
    for spend in spends:
        sigma = spend_sigma(spend)
        if sigma is None or sigma <= 0 or spend.get("sample_rate") is None or spend.get("steps") is None:
            return None
        history.append((sigma, float(spend["sample_rate"]), int(spend["steps"])))
    return epsilon_of(history, delta=delta, mechanism=mechanism) if spends else None


def budget_violations(ledger: dict[str, Any]) -> list[str]:
    """Changes of the budget after creation, and a budget list that was edited."""
    entries = [e for e in ledger.get("budget") or [] if isinstance(e, dict)]
    found = [
        f"budget changed from {before.get('epsilon_max')} to {after.get('epsilon_max')} at "
        f"{after.get('at')}: {after.get('reason')!r}"
        for before, after in zip(entries, entries[1:], strict=False)
    ]
    if entries and any("digest" in e for e in entries) and (broken := verify_chain(entries)):
        found.append(f"budget entry {broken} was edited (its digest does not match)")
    return found


def history_violations(spends: list[dict[str, Any]]) -> list[str]:
    if not any("digest" in s for s in spends):
        return []
    broken = verify_chain(spends)
    return [f"spend {broken} was edited, inserted or removed (its digest does not match)"] if broken else []


class BudgetProbe(ClientProbe):
    name = "budget"
    order = 120
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
                why = (
                    "client has neither an adapter nor a privacy ledger: train it with "
                    f"`pfi-rag train --client {client_id}`"
                )
                return self.skip(ctx, why, client=client_id)
            violations = ["an adapter exists but the client has no privacy ledger (privacy.json)"]
            return self.result(
                ctx, 1.0, client=client_id, evidence={"violations": violations}, metrics={"violations": 1.0}
            )
        privacy = ctx.config.privacy
        spends = ledger_spends(ledger)
        violations = budget_violations(ledger) + history_violations(spends)
        budget = float(ledger.get("epsilon_max", privacy.epsilon_max))
        entries = [e for e in ledger.get("budget") or [] if isinstance(e, dict)]
        if entries and entries[-1].get("epsilon_max") is not None:
            kept = float(entries[-1]["epsilon_max"])
            if abs(kept - budget) > 1e-9:
                violations.append(f"epsilon_max {budget:g} is not the budget history's {kept:g} (edited)")
            budget = kept
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
        mechanism = (ledger.get("accountant") or {}).get("mechanism", "rdp")
        mechanism = mechanism if mechanism in MECHANISMS else "rdp"
        recomputed = recomputed_epsilon(spends, float(delta), mechanism) if delta else None
        if recomputed is not None and spent < recomputed * (1 - RECOMPUTE_TOLERANCE):
            violations.append(
                f"ledger says epsilon {spent:.3f} but its {len(spends)} spends compose to {recomputed:.3f} "
                "(epsilon not carried across rounds)"
            )
        info = read_adapter_info(client_adapter_dir(ctx.data_root, client_id)) if trained else None
        if info is not None and info.epsilon is not None and info.epsilon > spent * (1 + 1e-6) + 1e-9:
            violations.append(
                f"the adapter has absorbed epsilon {info.epsilon:.3f} but the ledger records {spent:.3f} "
                "(ledger deleted or replaced)"
            )
        rounds = [r.number for r in ctx.history() if client_id in r.updates]
        trainings = [s for s in spends if s.get("kind", "dp-sgd") == "dp-sgd"]
        if len(rounds) > len(trainings):
            violations.append(
                f"took part in {len(rounds)} federation rounds but the ledger has {len(trainings)} spends"
            )
        evidence = {
            "violations": violations,
            "epsilon_spent": spent,
            "epsilon_max": budget,
            "epsilon_recomputed": recomputed,
            "delta": delta,
            "accountant": mechanism,
            "spends": len(spends),
            "spends_by_kind": {k: sum(s.get("kind", "dp-sgd") == k for s in spends) for k in kinds(spends)},
            "rounds_participated": rounds,
        }
        metrics = {"violations": float(len(violations)), "epsilon_spent_ratio": spent / budget}
        return self.result(ctx, float(len(violations)), client=client_id, evidence=evidence, metrics=metrics)


def kinds(spends: list[dict[str, Any]]) -> list[str]:
    return sorted({str(s.get("kind", "dp-sgd")) for s in spends})
