"""`pfi-rag data`: synthetic federated personal data with planted ground truth."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pfi_rag.cli.common import config_from, console, fail

app = typer.Typer(help="Synthetic federated personal data with planted ground truth.")


@app.command("synth")
def synth(
    ctx: typer.Context,
    clients: int = typer.Option(8, "--clients", min=1, max=1000, help="Number of clients."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: the config's seed)."),
    out: Path = typer.Option(None, "--out", help="Output directory (default: the data root)."),
    index: bool = typer.Option(
        True,
        "--index/--no-index",
        help="Write each client's documents into its store (what training reads), as `ingest` would.",
    ),
) -> None:
    """Write each client's documents, held-out QA, canaries, versioned facts and counterfactuals."""
    from pfi_rag import layout
    from pfi_rag.data.synth import ingest_synthetic, synthesize

    cfg = config_from(ctx)
    out = out or cfg.data_root
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory")
    manifest = synthesize(out, clients=clients, seed=cfg.seed if seed is None else seed)
    table = Table(title=f"synthetic data in {out}")
    for column in ("client", "documents", "facts", "canaries (repeats)", "size"):
        table.add_column(column)
    for client_id, truth in manifest["clients"].items():
        repeats = ", ".join(str(c["repeats"]) for c in truth["canaries"])
        size = "tiny" if truth["tiny"] else f"{truth['size_weight']:.2f}"
        table.add_row(client_id, str(truth["n_documents"]), str(len(truth["facts"])), repeats, size)
    console.print(table)
    if index:
        from pfi_rag.models.loading import load_embedder

        ingest_synthetic(out, list(manifest["clients"]), cfg.retrieval, load_embedder(cfg.models))
        console.print(f"documents written to each client's store under {layout.clients_dir(out)}")
    console.print(f"ground truth: {layout.manifest_file(out)}")
