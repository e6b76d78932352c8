"""`pfi-rag demo`: the whole product end to end on the built-in defaults (its steps: cli/end_to_end.py)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pfi_rag.cli import output
from pfi_rag.cli.common import config_with_defaults, console, fail

EXIT_FAILED = 1


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        ctx: typer.Context,
        quick: bool = typer.Option(
            False, "--quick", help="One round, fewer DP steps, tokens and probe samples."
        ),
        generator: str = typer.Option(None, "--generator", help="Override models.generator."),
    ) -> None:
        """Synthesise 4 clients, index, federate with DP, serve over HTTP, probe, report (minutes on CPU)."""
        from pfi_rag.cli.end_to_end import FULL, QUICK, DemoError, run_demo
        from pfi_rag.federation.server import FederationFailed

        preset = QUICK if quick else FULL
        # The preset's settings are defaults: an explicit --set of the same key wins.
        cfg = config_with_defaults(ctx, preset.overrides(), **{"models.generator": generator})
        started = time.perf_counter()
        verbose = (ctx.find_root().obj or {}).get("verbose", False)
        handlers = []

        def log_libraries(root: Path) -> None:
            # Flower's, Ray's and transformers' own output goes here instead of between the steps.
            from pfi_rag.layout import library_log_file

            path = library_log_file(root)
            handlers.append(output.log_libraries_to(path))
            console.print(f"library log (Flower, Ray, transformers): {path}; --verbose prints it instead")

        try:
            run_demo(cfg, preset, console, on_root=None if verbose else log_libraries)
        except DemoError as exc:
            fail(str(exc))
        except FederationFailed as exc:
            fail(f"the federation failed: {exc}", code=EXIT_FAILED)
        finally:
            for handler in handlers:
                output.stop_logging_to(handler)
        console.rule(f"[bold green]demo finished in {time.perf_counter() - started:.0f} s")
