"""DP-SGD adapter training, the per-client privacy ledger, and the only update that may leave a client.

- :func:`train_adapter` trains a client's LoRA adapter with Opacus (Poisson sampling, per-record
  clipping, Gaussian noise) and charges the spend to the client's :class:`PrivacyLedger`.
- :class:`PrivacyLedger` persists the accountant state in ``clients/<id>/privacy.json`` and
  refuses (:class:`BudgetExceeded`) a call that would pass ``privacy.epsilon_max``.
- :func:`build_outgoing_update` turns a DP-trained adapter into the shared, clipped, noised delta
  with its privacy metadata: the one thing a client sends.
"""

from pfi_rag.privacy.errors import BudgetExceeded, PrivacyError
from pfi_rag.privacy.ledger import PrivacyLedger, Spend
from pfi_rag.privacy.training import StepInfo, TrainResult, train_adapter
from pfi_rag.privacy.update import OutgoingUpdate, build_outgoing_update

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
