"""Dependencies of the routes, as ``Annotated`` aliases: the services, the caller, ownership.

Ownership is checked here and only here: a route that takes ``OwnedClient`` can only ever see
the client its key belongs to. Another client's id, an id that does not exist and an invalid
id all give the same 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pfi_rag.api.auth import Principal
from pfi_rag.api.errors import ApiError, not_found
from pfi_rag.api.services import Services

bearer = HTTPBearer(auto_error=False, description="An API key from `pfi-rag clients create`.")


def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise ApiError(503, "not_ready", "the server is still loading its models")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_principal(
    services: ServicesDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The caller, from ``Authorization: Bearer <key>``; each key is rate limited on its own."""
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    principal = services.keys.authenticate(credentials.credentials)
    if principal is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key")
    wait = services.limiter.take(principal.key_id)
    if wait > 0:
        raise ApiError(
            429,
            "rate_limited",
            f"over {services.cfg.serving.requests_per_minute} requests per minute for this key; "
            f"retry in {wait:.1f} s",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def get_owned_client(
    principal: CurrentPrincipal, client_id: Annotated[str, Path(min_length=1, max_length=64)]
) -> str:
    if principal.client_id is None or principal.client_id != client_id:
        raise not_found()
    return client_id


OwnedClient = Annotated[str, Depends(get_owned_client)]


def get_key_client(principal: CurrentPrincipal) -> str:
    """The client a key belongs to (chat completions: the key decides the client)."""
    if principal.client_id is None:
        raise ApiError(403, "forbidden", "an admin key has no client: use the client's own key")
    return principal.client_id


KeyClient = Annotated[str, Depends(get_key_client)]


def get_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.admin:
        raise ApiError(403, "forbidden", "this route needs an admin key (`pfi-rag clients create --admin`)")
    return principal


AdminKey = Annotated[Principal, Depends(get_admin)]
