"""`pfi-rag train|privacy`: local DP-SGD personalization and the privacy ledger (issue #5)."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train() -> None:
        """DP-train a client's LoRA adapter on its local data."""
        not_built("train", 5)

    @app.command("privacy")
    def privacy() -> None:
        """Show a client's privacy ledger (every spend and the epsilon left)."""
        not_built("privacy", 5)
