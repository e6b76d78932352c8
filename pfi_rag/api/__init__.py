"""The HTTP service: FastAPI app, routes, schemas, API keys, limits, metrics, serve-time probes."""

from pfi_rag.api.app import create_app

__all__ = ["create_app"]
