"""`pfi-rag generate`: one personalized, retrieval-grounded answer (issue #4)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate() -> None:
        """Answer a question as a client: its adapter, its retrieved documents."""
        not_built("generate", 4)
