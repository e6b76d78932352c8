"""Liveness, readiness and Prometheus metrics (no key needed; nothing per client in them)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from pfi_rag.api.errors import ApiError
from pfi_rag.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
def get_health() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get(
    "/readyz", responses={503: {"description": "Models still loading, or the batching worker stopped"}}
)
def get_readiness(request: Request) -> Readiness:
    """The models are loaded and the batching worker runs."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise ApiError(503, "not_ready", "the models are still loading")
    if not services.running:
        raise ApiError(503, "not_ready", "the server is shutting down")
    models = services.cfg.models
    return Readiness(ready=True, generator=models.generator, embedder=models.embedder, scheduler_running=True)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def get_metrics(request: Request) -> Response:
    """Prometheus metrics: requests, latency, tokens, probe time, flagged answers."""
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
