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
from pfi_rag.probes.items import answer_nll


class OutOfDomainProbe(FederationProbe):
    name = "ood"
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
        tok = ctx.tokenizer
        base = {c: answer_nll(ctx.base_model(), tok, ctx.eval_items(c)) for c in with_qa}
        matrix = np.zeros((len(rows), len(with_qa)))
        for i, adapter_owner in enumerate(rows):
            model = ctx.client_model(adapter_owner)
            for j, data_owner in enumerate(with_qa):
                matrix[i, j] = answer_nll(model, tok, ctx.eval_items(data_owner)) - base[data_owner]
        offdiag = [
            (matrix[i, j], rows[i], with_qa[j])
            for i in range(len(rows))
            for j in range(len(with_qa))
            if rows[i] != with_qa[j]
        ]
        worst_value, worst_adapter, worst_data = max(offdiag)
        evidence = {
            "adapters": rows,
            "data": with_qa,
            "matrix": matrix.tolist(),
            "base_nll": base,
            "worst": {"adapter": worst_adapter, "data": worst_data, "nll_increase": float(worst_value)},
            FLAGGED_CLIENTS: [worst_adapter],  # the adapter that hurts another client most
        }
        return self.result(ctx, float(worst_value), evidence=evidence)
