"""`pfi-rag bench silent-failures`: the silent-failure benchmark (pfi_rag/benchmark)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from pfi_rag import layout
from pfi_rag.cli.common import config_with_defaults, console, fail


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Benchmarks of the whole pipeline.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

    @bench_app.command("silent-failures")
    def silent_failures(
        ctx: typer.Context,
        preset: str = typer.Option(
            "quick",
            "--preset",
            help="quick: tiny random model, ~20 min on 2 cores; full: SmolLM2-135M, 4-6 h.",
        ),
        seeds: int = typer.Option(None, "--seeds", min=1, help="Seeds per scenario (default: the preset's)."),
        scenarios: str = typer.Option(
            None, "--scenarios", help="Comma-separated scenario names (default: all; clean always runs)."
        ),
        world: str = typer.Option(
            "synthetic",
            "--world",
            help="synthetic: clients from `data synth`; realtext: chatterbot-corpus topics as .txt files.",
        ),
        matrix: bool = typer.Option(True, "--matrix/--no-matrix", help="Run the planted-failure runs."),
        tradeoff: bool = typer.Option(True, "--tradeoff/--no-tradeoff", help="Run the privacy/utility part."),
        out: Path = typer.Option(Path("bench/results"), "--out", help="Where the table, JSON and plots go."),
        round_references: bool = typer.Option(
            True,
            "--round-references/--no-round-references",
            help="Probe clean runs after every round too: a healthy reference each, one more suite a round.",
        ),
        planted_probes: str = typer.Option(
            "all",
            "--planted-probes",
            help="all: every planted run runs every probe; intended: only the probes meant to catch "
            "its failure and the record-only ones (clean runs always run every probe).",
        ),
        gpu: bool = typer.Option(False, "--gpu", help="Run the models on CUDA (models.device=cuda)."),
        fresh: bool = typer.Option(
            False,
            "--fresh",
            help="Discard the runs finished by earlier invocations (by default those with the same "
            "settings are reused and only the missing ones run).",
        ),
        report_only: bool = typer.Option(
            False,
            "--report-only",
            help="Run nothing: write the tables from the runs finished so far with the same "
            "settings (safe while another invocation is still running them).",
        ),
    ) -> None:
        """Plant each silent failure in a federated run, score the probes against the ground truth,
        and measure privacy against utility."""
        from dataclasses import replace

        from pfi_rag.benchmark.runs import PLANTED_PROBES
        from pfi_rag.benchmark.scenarios import WORLDS, scenario_named
        from pfi_rag.benchmark.silent_failures import PRESETS, run_benchmark
        from pfi_rag.benchmark.worklog import SettingsChanged
        from pfi_rag.federation.server import FederationFailed

        if preset not in PRESETS:
            fail(f"unknown preset {preset!r}: choose {' or '.join(PRESETS)}")
        if planted_probes not in PLANTED_PROBES:
            fail(f"unknown --planted-probes {planted_probes!r}: choose {' or '.join(PLANTED_PROBES)}")
        if world not in WORLDS:
            fail(f"unknown world {world!r}: choose {' or '.join(WORLDS)}")
        if report_only and fresh:
            fail("--report-only reads the finished runs and --fresh discards them: pass one of the two")
        chosen = PRESETS[preset] if seeds is None else replace(PRESETS[preset], seeds=seeds)
        picked = WORLDS[world]
        if scenarios:
            try:
                named = [scenario_named(name.strip(), world) for name in scenarios.split(",") if name.strip()]
            except KeyError as exc:
                fail(str(exc.args[0]))
            picked = (scenario_named("clean", world), *[s for s in named if s.name != "clean"])
        defaults = chosen.overrides()
        if gpu:
            import torch

            if not torch.cuda.is_available():
                fail("--gpu: torch sees no CUDA device here; run without --gpu to use the CPU")
            defaults["models.device"] = "cuda"
        if world == "realtext":
            from pfi_rag.benchmark.realtext import OVERRIDES, RealTextUnavailable, corpus_dir

            try:
                corpus_dir()
            except RealTextUnavailable as exc:
                fail(str(exc))
            defaults |= OVERRIDES
            if tradeoff:
                console.print("the privacy/utility part runs on the synthetic world only: left out")
            tradeoff = False
        cfg = config_with_defaults(ctx, defaults)  # an explicit --set wins over the preset
        work = layout.bench_dir(cfg.data_root)  # finished runs with the same settings are reused
        parts = [f"{len(picked)} scenarios x {chosen.seeds} seeds"] if matrix else []
        parts += [f"privacy/utility at epsilon {chosen.tradeoff_epsilons}"] if tradeoff else []
        console.print(
            f"silent-failure benchmark, preset {chosen.name}, {world} world: "
            f"{' and '.join(parts) or 'nothing to run'} "
            f"on {cfg.models.generator}; work in {work}, results in {out}",
            soft_wrap=True,
        )
        started = time.perf_counter()
        try:
            result = run_benchmark(
                cfg,
                preset=chosen,
                out=out,
                work=work,
                scenarios=picked,
                world=world,
                matrix=matrix,
                tradeoff=tradeoff,
                probe_rounds=round_references,
                planted_probes=planted_probes,
                fresh=fresh,
                report_only=report_only,
                on_event=lambda line: console.print(line, highlight=False, soft_wrap=True),
            )
        except SettingsChanged as exc:
            fail(str(exc))
        except FederationFailed as exc:
            fail(f"a federated run failed: {exc}", code=1)
        console.print((out / "silent-failures.md").read_text(), highlight=False, soft_wrap=True)
        for name, path in result["outputs"].items():
            console.print(f"{name}: {path}")
        if result["meta"]["references"]:
            console.print(
                f"{len(result['meta']['references'])} healthy probe reports for "
                f"`pfi-rag calibrate-probes {work}/references/*/report.json --out thresholds.toml`",
                soft_wrap=True,
            )
        meta = result["meta"]
        console.print(
            f"runs reused: {meta['reused']}; invocations so far: {meta['invocations']}; "
            f"the runs' own time summed: {meta['run_seconds'] / 60:.1f} min",
            soft_wrap=True,
        )
        if report_only:
            from pfi_rag.benchmark.report import not_finished

            console.rule(f"[bold]report from the finished runs; {not_finished(meta)} not finished yet")
            return
        if meta["failed_runs"]:
            for run in meta["failed_runs"]:
                console.print(f"failed: {run['scenario']} seed {run['seed']}: {run['error']}", soft_wrap=True)
            fail(
                f"{len(meta['failed_runs'])} federated runs failed and were left out of the report; "
                "run the same command again to run them (the finished ones are reused)",
                code=1,
            )
        console.rule(f"[bold green]benchmark finished in {(time.perf_counter() - started) / 60:.1f} min")
