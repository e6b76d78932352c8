"""`pfi-rag bench`: the silent-failure benchmark (issue #9)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench() -> None:
        """Plant failures, score the probes, measure privacy/utility."""
        not_built("bench", 9)
