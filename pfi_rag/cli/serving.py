"""`pfi-rag serve|clients`: the HTTP service and its per-client keys (issue #7)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve() -> None:
        """Serve personalized generation over HTTP."""
        not_built("serve", 7)

    @app.command("clients")
    def clients() -> None:
        """Create clients and their API keys."""
        not_built("clients", 7)
