"""A client's privacy ledger: ``GET /v1/clients/{client_id}/privacy``."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from pfi_rag.api.deps import OwnedClient, ServicesDep
from pfi_rag.api.errors import ERROR_RESPONSES
from pfi_rag.api.schemas import PrivacyPublic
from pfi_rag.privacy.ledger import PrivacyLedger

router = APIRouter(tags=["privacy"], responses=ERROR_RESPONSES)


@router.get("/v1/clients/{client_id}/privacy")
def get_privacy(client_id: OwnedClient, services: ServicesDep) -> PrivacyPublic:
    """Epsilon spent, the budget, and every spend of the client: DP-SGD, metric and probe releases."""
    ledger = PrivacyLedger.open(services.cfg.data_root, client_id, services.cfg.privacy)
    return PrivacyPublic(
        client_id=client_id,
        accountant=ledger.mechanism,
        delta=ledger.delta,
        epsilon_spent=ledger.epsilon_spent,
        epsilon_max=ledger.epsilon_max,
        epsilon_remaining=ledger.remaining,
        spends=[asdict(spend) for spend in ledger.spends],
    )
