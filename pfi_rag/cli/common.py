"""What every command shares: the effective config, clear errors, and output for people or machines."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

from pfi_rag.config import Config, ConfigError, load_config, parse_override

console = Console()
err_console = Console(stderr=True)

# Exit codes: 0 ok, 1 a check found a failure (probes), 2 bad input.
EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one line saying what is wrong (and how to fix it), then exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def config_from(ctx: typer.Context, **overrides: Any) -> Config:
    """The config from the global options, with this command's own flags on top.

    ``overrides`` are dotted keys; ``None`` values (flags not given) are ignored.
    """
    options = ctx.find_root().obj or {}
    merged = dict(options.get("overrides", {}))
    merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return load_config(options.get("config_path"), merged)
    except ConfigError as exc:
        fail(str(exc))


def config_with_defaults(ctx: typer.Context, defaults: dict[str, Any], **overrides: Any) -> Config:
    """:func:`config_from`, with ``defaults`` (dotted keys, e.g. a preset's) applied to every key
    the user did not ``--set`` explicitly: an explicit ``--set`` of the same key wins."""
    explicit = (ctx.find_root().obj or {}).get("overrides", {})
    return config_from(
        ctx, **{key: value for key, value in defaults.items() if key not in explicit}, **overrides
    )


def parse_set_flags(assignments: list[str]) -> dict[str, str]:
    try:
        return dict(parse_override(item) for item in assignments)
    except ConfigError as exc:
        fail(str(exc))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
