"""`pfi-rag probe`: the silent-failure probe suite (issue #8)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe() -> None:
        """Audit clients and the federation for silent failures."""
        not_built("probe", 8)
