"""`pfi-rag config`: inspect the effective configuration."""

from __future__ import annotations

import typer

from pfi_rag.cli.common import config_from, print_json

app = typer.Typer(help="Inspect the effective configuration (file + environment + flags).")


@app.command("show")
def show(ctx: typer.Context) -> None:
    """Print the effective config as JSON, after the TOML file, PFI_RAG_* variables and --set."""
    print_json(config_from(ctx).model_dump(mode="json"))
