"""DP-SGD adapter training, the per-client privacy ledger, and the only update that may leave a client.

- :func:`train_adapter` trains a client's LoRA adapter with Opacus (Poisson sampling, per-record
  clipping, Gaussian noise) and charges the spend to the client's :class:`PrivacyLedger`.
- :class:`PrivacyLedger` persists the accountant state in ``clients/<id>/privacy.json`` and
  refuses (:class:`BudgetExceeded`) a call that would pass ``privacy.epsilon_max``.
- :func:`build_outgoing_update` turns a DP-trained adapter into the shared, clipped, noised delta
  with its privacy metadata: the one thing a client sends.
"""

from __future__ import annotations

import importlib
from typing import Any

from pfi_rag.privacy.errors import BudgetExceeded, PrivacyError

# Imported on first use, so that reading one module of this package (the server's
# round_metrics, the probes' ledger) does not pull in Opacus and torch.
_EXPORTS = {
    "PrivacyLedger": "ledger",
    "Spend": "ledger",
    "StepInfo": "training",
    "TrainResult": "training",
    "train_adapter": "training",
    "OutgoingUpdate": "update",
    "build_outgoing_update": "update",
}

__all__ = [
    "BudgetExceeded",
    "OutgoingUpdate",
    "PrivacyError",
    "PrivacyLedger",
    "Spend",
    "StepInfo",
    "TrainResult",
    "build_outgoing_update",
    "train_adapter",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pfi_rag.privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pfi_rag.privacy.{_EXPORTS[name]}"), name)
