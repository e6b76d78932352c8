"""Prometheus metrics of one server: requests, latency, tokens, probe time, flagged answers.

Each app gets its own registry, so several servers in one process (tests) never collide.
Labels are routes (templates, never concrete paths) and probe names: no client ids, so the
metrics reveal nothing about who uses the service.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pfi_rag_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pfi_rag_request_seconds",
            "HTTP request latency (to the last byte)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "pfi_rag_tokens", "Tokens processed by generation", ["kind"], registry=self.registry
        )
        self.answers = Counter("pfi_rag_answers", "Answers generated", registry=self.registry)
        self.flagged = Counter(
            "pfi_rag_flagged_answers",
            "Answers flagged by a serve-time probe",
            ["probe"],
            registry=self.registry,
        )
        self.probe_seconds = Histogram(
            "pfi_rag_probe_seconds",
            "Time spent in serve-time probes per answer",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _route_of(scope: Scope, routes=None):
    """The route a request was for when it never reached routing (refused or abandoned mid-body)."""
    if routes is None:
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI keeps included routers nested
        found = _route_of(scope, inner.routes) if inner is not None else None
        if found is None and inner is None and route.matches(scope)[0] == Match.FULL:
            found = route
        if found is not None:
            return found
    return None


DISCONNECTED = "499"  # the client left before a response was sent (nginx's code for it)


class MetricsMiddleware:
    """Counts every request and times it to its last body byte (streams included).

    Status: the one sent; 500 when the app raised; ``499`` when it sent nothing and raised
    nothing, i.e. the client went away first (mid-body, or before its answer was ready).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | str = DISCONNECTED

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if status == DISCONNECTED:
                status = 500
            raise
        finally:
            route = scope.get("route") or _route_of(scope)
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)
