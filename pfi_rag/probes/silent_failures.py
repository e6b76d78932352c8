"""Clients failing silently, from the round history (probes/history.py).

Per client: errors recorded in a round that the federation still completed, selected but
neither updated nor failed, a zero-norm update (nothing trained), a training loss that fell in
none of the client's rounds once it has taken part in ``MIN_ROUNDS_FOR_PROGRESS`` (exact
metrics only: privacy.round_metrics = "exact"), or a client with data that never took part.
"""

from __future__ import annotations

from pfi_rag.probes import missing
from pfi_rag.probes.base import FLAGGED_CLIENTS, FederationProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext

# DP noise can undo a healthy client's progress in a round: on the quick benchmark's 2 rounds of
# 3 DP steps, one clean run in eight had a client whose loss rose in both. Judged over 3 or more
# rounds, a loss that never fell is rare enough in health to be worth a look.
MIN_ROUNDS_FOR_PROGRESS = 3


class SilentFailuresProbe(FederationProbe):
    name = "silent_failures"
    order = 180
    mode = "clients failing silently"
    suites = ("federation",)
    needs = (Need.HISTORY, Need.CLIENT_DATA)
    metric = "silent_failures"

    def run_federation(self, ctx: ProbeContext, client_ids: list[str]) -> ProbeResult:
        rounds = ctx.history()
        if not rounds:
            return self.skip(ctx, missing.NO_HISTORY)
        problems = []
        seen: set[str] = set()
        progress: dict[str, list[tuple[int, float, float]]] = {}  # client -> (round, before, after)
        for r in rounds:
            failed = {f.client: f.error for f in r.failures}
            for client, error in sorted(failed.items()):
                problems.append({"round": r.number, "client": client, "why": f"failed: {error}"})
            for client in r.participants:
                if client not in r.updates and client not in failed:
                    problems.append(
                        {"round": r.number, "client": client, "why": "selected, no update, no error"}
                    )
            for client, update in sorted(r.updates.items()):
                seen.add(client)
                if update.norm == 0:
                    problems.append({"round": r.number, "client": client, "why": "zero-norm update"})
            for client, m in sorted(r.metrics.items()):
                before, after = m.loss_before, m.loss_after
                # Noised (private) metrics are too rough for one client's progress: skip them.
                if before is not None and after is not None and not m.noised:
                    progress.setdefault(client, []).append((r.number, before, after))
            seen.update(failed)
            seen.update(s.client for s in r.sat_out)
        for client, steps in sorted(progress.items()):
            # DP noise may undo one round's progress; no progress in any round is a broken client.
            stuck = all(not after < before for _, before, after in steps)
            if stuck and len(steps) >= MIN_ROUNDS_FOR_PROGRESS:
                shown = "; ".join(f"round {n}: {b:.4g} -> {a:.4g}" for n, b, a in steps)
                why = f"loss never fell ({shown})"
                problems.append({"round": steps[-1][0], "client": client, "why": why})
        for client in client_ids:
            if client not in seen:
                problems.append({"round": None, "client": client, "why": "has data but never took part"})
        clients = sorted({p["client"] for p in problems})
        evidence = {"problems": problems, FLAGGED_CLIENTS: clients, "rounds": len(rounds)}
        return self.result(ctx, float(len(problems)), evidence=evidence)
