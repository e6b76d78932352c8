"""Out-of-domain degradation: does client i's adapter hurt on client j's data?

The cross-client matrix holds, for adapter i (row) on client j's held-out questions
(column), the change in answer NLL (nats/token) against the base model: positive is worse.
The questions are each client's evaluation items (probes/items.py).
Off-diagonal cells are other clients' (out-of-domain) data; the diagonal is the adapter's
own gain. Adapters would have to cross clients, so the private mode skips this probe.
"""

from __future__ import annotations

import numpy as np

from pfi_rag.probes import missing
from pfi_rag.probes.base import FLAGGED_CLIENTS, FederationProbe, Need, ProbeResult
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.items import nll_gain


class OutOfDomainProbe(FederationProbe):
    name = "ood"
    order = 60
    mode = "out-of-domain degradation"
    suites = ("fairness",)
    needs = (Need.BASE_MODEL, Need.CLIENT_ADAPTER, Need.CLIENT_DATA)
    metric = "worst_offdiag_nll_increase"
    private_ok = False

    def run_federation(self, ctx: ProbeContext, client_ids: list[str]) -> ProbeResult:
        with_qa = [c for c in client_ids if ctx.eval_items(c)]
        rows = [c for c in with_qa if ctx.client_model(c) is not None]
        if len(with_qa) < 2:
            return self.skip(ctx, f"{missing.TWO_CLIENTS} (each with held-out documents)")
        if not rows:
            return self.skip(ctx, "no client has an adapter: run `pfi-rag federate`")
        # Each cell is the NLL gain of the base over adapter i on client j's items, negated (a
        # positive cell is worse than the base), sampled until precise or clear of the threshold.
        threshold = self.threshold(ctx)
        cells = {}
        for adapter_owner in rows:
            for data_owner in with_qa:
                gain = nll_gain(ctx, data_owner, "base", f"client:{adapter_owner}", threshold=-threshold)
                cells[adapter_owner, data_owner] = gain
        matrix = np.array([[-cells[i, j].estimate for j in with_qa] for i in rows])
        base = {c: ctx.item_scores("base", c, max(cells[i, c].n for i in rows)).answer_nll() for c in with_qa}
        offdiag = [
            (matrix[i, j], rows[i], with_qa[j])
            for i in range(len(rows))
            for j in range(len(with_qa))
            if rows[i] != with_qa[j]
        ]
        worst_value, worst_adapter, worst_data = max(offdiag)
        worst_gain = cells[worst_adapter, worst_data]
        evidence = {
            "adapters": rows,
            "data": with_qa,
            "matrix": matrix.tolist(),
            "base_nll": base,
            "worst": {"adapter": worst_adapter, "data": worst_data, "nll_increase": float(worst_value)},
            "interval": [-worst_gain.high, -worst_gain.low],  # of the worst cell: the value reported
            "items": {f"{i}->{j}": g.n for (i, j), g in cells.items()},
            FLAGGED_CLIENTS: [worst_adapter],  # the adapter that hurts another client most
        }
        return self.result(ctx, float(worst_value), evidence=evidence)
