"""API keys, for admin keys only: ``/v1/keys`` (the CLI, ``pfi-rag clients``, does the same)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from pfi_rag.api.auth import ADMIN, KeyStoreError
from pfi_rag.api.deps import AdminKey, ServicesDep
from pfi_rag.api.errors import ERROR_RESPONSES, ApiError, not_found
from pfi_rag.api.schemas import KeyCreate, KeyIssued, KeyList, KeyPublic

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]})


@router.get("")
def list_keys(admin: AdminKey, services: ServicesDep) -> KeyList:
    """Every key's owner and creation time (never the key or its hash)."""
    return KeyList(keys=[KeyPublic(**record.public()) for record in services.keys.records()])


@router.post("", status_code=201)
async def create_key(body: KeyCreate, admin: AdminKey, services: ServicesDep) -> KeyIssued:
    """Issue a key for a client; the key is in this response only."""
    if body.client_id == ADMIN:
        raise ApiError(400, "invalid_request", f"client_id: {ADMIN!r} is reserved for admin keys")
    try:
        key, record = await run_in_threadpool(services.keys.create, body.client_id, replace=body.replace)
    except KeyStoreError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return KeyIssued(**record.public(), key=key)


@router.delete("/{client_id}")
def revoke_keys(
    client_id: Annotated[str, Path(min_length=1, max_length=64)], admin: AdminKey, services: ServicesDep
) -> dict[str, int]:
    """Revoke every key of a client."""
    revoked = services.keys.revoke(client_id)
    if not revoked:
        raise not_found("key")
    return {"revoked": revoked}
