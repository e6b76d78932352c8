"""`pfi-rag federate|deploy`: the Flower training launcher (issue #6)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("federate")
    def federate() -> None:
        """Run federated DP personalization on Flower's simulation engine."""
        not_built("federate", 6)

    @app.command("deploy")
    def deploy() -> None:
        """Run the federation as real SuperLink/SuperNode processes."""
        not_built("deploy", 6)
