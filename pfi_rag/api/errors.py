"""One JSON error shape for every failure: ``{"error": {"type": ..., "message": ...}}``.

Domain errors of the layers below map to 4xx here, once, instead of in each route; whatever
else escapes is a bug and is logged as one (500 with a generic message, no traceback out).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pfi_rag.api.answering import ClientGone
from pfi_rag.api.compat import is_openai_path, openai_error
from pfi_rag.api.schemas import ErrorResponse
from pfi_rag.layout import InvalidClientId
from pfi_rag.models import AdapterLoadError, InvalidRequest, PromptTooLong, SchedulerStopped
from pfi_rag.privacy.errors import PrivacyError
from pfi_rag.retriever import RetrieverError, StoreBusy

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, error_type, message, headers
        self.param = param  # the request field at fault (OpenAI's error shape names it)


def not_found(what: str = "client") -> ApiError:
    """The same answer for "does not exist" and "not yours", so nobody can probe what exists."""
    return ApiError(404, "not_found", f"{what} not found")


def error_response(
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    request: Request | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The product's error shape; OpenAI's on the OpenAI routes (see :mod:`pfi_rag.api.compat`)."""
    if request is not None and is_openai_path(request.url.path):
        status, body = openai_error(status, error_type, message, param)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(
        {"error": {"type": error_type, "message": message}}, status_code=status, headers=headers
    )


# Status and error type of the domain errors, most specific first.
DOMAIN_ERRORS: list[tuple[type[Exception], int, str]] = [
    (ClientGone, 499, "client_disconnected"),  # nobody reads it; the metrics count a disconnect
    (InvalidClientId, 404, "not_found"),
    (PromptTooLong, 400, "prompt_too_long"),
    (InvalidRequest, 400, "invalid_request"),
    (RetrieverError, 400, "invalid_request"),
    (StoreBusy, 409, "store_busy"),
    (PrivacyError, 409, "privacy_config"),
    (AdapterLoadError, 503, "adapter_unavailable"),
    (SchedulerStopped, 503, "not_ready"),
    (UnicodeError, 400, "invalid_request"),
]

# Documented on every route, so OpenAPI (and schemathesis) know the error shape.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Bad input (the message says what to fix)"),
        (401, "Missing or unknown API key"),
        (403, "The key may not use this route (admin routes, chat with an admin key)"),
        (404, "Not found, or not this key's (the two look the same)"),
        (413, "Body over serving.max_body_bytes"),
        (422, "Malformed request (the message names the field)"),
        (429, "Over serving.requests_per_minute for this key"),
    ]
}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        # Union members' tags ("constrained-str", "list[ContentPart]") name no field: left out.
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(p for p in loc if p not in ("str", "constrained-str") and "[" not in p) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            exc.status, exc.type, exc.message, exc.headers, request=request, param=exc.param
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", _validation_message(exc), request=request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, kind, str(exc.detail), headers, request=request)

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        for cls, status, error_type in DOMAIN_ERRORS:
            if isinstance(exc, cls):
                message = "text must be valid Unicode" if isinstance(exc, UnicodeError) else str(exc)
                if isinstance(exc, PromptTooLong) and is_openai_path(request.url.path):
                    message = "messages: the messages are longer than this model's prompt limit; shorten them"
                return error_response(status, error_type, message, request=request)
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error (logged)", request=request)

    for cls, _, _ in DOMAIN_ERRORS:
        app.add_exception_handler(cls, domain_error)
    app.add_exception_handler(Exception, domain_error)
