"""The HTTP service: FastAPI app, routes, schemas, API keys, limits, metrics, serve-time probes."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `pfi-rag clients create` reads pfi_rag.api.auth and must not pay
    # for FastAPI, torch and the model stack that the app pulls in.
    if name == "create_app":
        from pfi_rag.api.app import create_app

        return create_app
    raise AttributeError(f"module 'pfi_rag.api' has no attribute {name!r}")
