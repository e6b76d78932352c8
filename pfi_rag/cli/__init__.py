"""The `pfi-rag` command: one entry point for the three doors and everything around them.

Each group of commands lives in its own module beside this one; this module only wires them
together and reads the global options (``--config``, ``--set``, ``--data-root``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from pfi_rag.cli import (
    bench,
    config,
    data,
    demo,
    federation,
    generation,
    output,
    probing,
    retrieval,
    serving,
    training,
)
from pfi_rag.cli.common import parse_set_flags

app = typer.Typer(
    name="pfi-rag",
    help="Federated, differentially private, retrieval-augmented personalization of foundation "
    "models, with probes for its silent failures.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main_options(
    ctx: typer.Context,
    config_path: Path = typer.Option(
        None, "--config", "-c", help="TOML config file (default: ./pfi-rag.toml if present)."
    ),
    data_root: Path = typer.Option(None, "--data-root", help="Override the data root."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override any config key, e.g. --set privacy.epsilon_max=4 (repeatable)."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log progress details and the libraries' own output (Flower, Ray...)."
    ),
) -> None:
    output.configure(verbose=verbose)
    overrides = parse_set_flags(set_)
    if data_root is not None:
        overrides["data_root"] = str(data_root)
    ctx.obj = {"config_path": config_path, "overrides": overrides, "verbose": verbose}


app.add_typer(config.app, name="config")
app.add_typer(data.app, name="data")
retrieval.register(app)
training.register(app)
federation.register(app)
generation.register(app)
serving.register(app)
probing.register(app)
bench.register(app)
demo.register(app)


def main() -> None:
    app()
