"""The FastAPI app: routers, error handlers, limits and metrics; models load once in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from pfi_rag.api import errors
from pfi_rag.api.limits import BODY_TIMEOUT_S, BodyLimit
from pfi_rag.api.metrics import Metrics, MetricsMiddleware
from pfi_rag.api.routes import chat, documents, generate, health, keys, models, privacy
from pfi_rag.api.schemas import DocumentsCreate
from pfi_rag.api.services import Services
from pfi_rag.config import Config

logger = logging.getLogger(__name__)


def create_app(cfg: Config, *, embedder=None, engine=None, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The service for ``cfg``; ``embedder``/``engine`` skip loading them (tests, benchmarks)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            services = await run_in_threadpool(Services.start, cfg, metrics, embedder=embedder, engine=engine)
        except Exception as exc:  # uvicorn only logs a failed start-up: keep why, for whoever started it
            app.state.startup_error = exc
            raise
        app.state.services = services
        logger.info("pfi-rag ready: generator %s, embedder %s", cfg.models.generator, cfg.models.embedder)
        try:
            yield
        finally:
            app.state.services = None
            await run_in_threadpool(services.close)

    app = FastAPI(
        title="pfi-rag",
        version="0.1.0",
        description="Personalized, retrieval-grounded generation per client, with failure probes on "
        "every answer. Authenticate with `Authorization: Bearer <key>` (`pfi-rag clients create ID`).",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.services = None
    app.state.startup_error = None
    errors.install(app)
    for module in (documents, generate, chat, models, privacy, keys, health):
        app.include_router(module.router)
    # Outermost first: count every request, then refuse oversized bodies before parsing them.
    app.add_middleware(BodyLimit, max_bytes=cfg.serving.max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the JSON body of add_documents (its route reads JSON or multipart itself)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = DocumentsCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["DocumentsCreate"] = body
        app.openapi_schema = schema
    return app.openapi_schema
