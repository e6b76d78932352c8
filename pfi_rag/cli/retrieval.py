"""`pfi-rag ingest|search|docs`: each client's local document index (issue #3)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest() -> None:
        """Add documents (text, .txt/.md files, JSONL) to a client's index."""
        not_built("ingest", 3)

    @app.command("search")
    def search() -> None:
        """Search a client's index."""
        not_built("search", 3)

    @app.command("docs")
    def docs() -> None:
        """List, show or delete a client's documents."""
        not_built("docs", 3)
