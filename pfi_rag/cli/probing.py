"""`pfi-rag probe`: the silent-failure probe suite, a deployment gate.

Exit 0 when every probe passes (or is skipped for lack of what it needs), 1 when a probe
flags a failure or crashes, 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pfi_rag.cli.common import config_from, console, fail, print_json

VERDICT_STYLE = {"pass": "green", "fail": "bold red", "error": "bold red", "skip": "dim"}


def _summary_table(report) -> Table:
    mode = "private releases" if report.private else "plain"
    table = Table(title=f"probe suite '{report.suite}' over {len(report.clients)} clients ({mode})")
    for column in ("probe", "mode", "metric", "worst / value", "fails when", "verdict", "flagged / why"):
        table.add_column(column)
    for s in report.summaries:
        value = "" if s.value is None else f"{s.value:.4g}"
        if s.sigma is not None:
            value += f" ± {s.sigma:.2g} (σ)"
        style = VERDICT_STYLE[str(s.verdict)]
        if s.verdict == "skip":
            why = next(iter(s.skipped.values()), "")
        else:
            why = ", ".join(s.flagged_clients) or ", ".join(s.errors)
        table.add_row(
            s.probe,
            s.mode,
            s.metric,
            value,
            f"{'>' if s.fails_above else '<'} {s.threshold:g}",
            f"[{style}]{s.verdict}[/]",
            why,
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        ctx: typer.Context,
        suite: str = typer.Option("all", "--suite", help="all, privacy, fairness, rag or federation."),
        clients: list[str] = typer.Option(
            None, "--clients", help="Clients to audit (repeatable or comma-separated; default: all)."
        ),
        out: Path = typer.Option(None, "--out", help="Directory for report.json and report.html."),
        private: bool = typer.Option(
            None,
            "--private/--plain",
            help="Private: clients release only clipped, noised metrics (epsilon: probes.release_epsilon).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the JSON report instead of the table."),
    ) -> None:
        """Audit clients and the federation for silent failures; exit 1 if any probe fails."""
        from pfi_rag.config import ConfigError
        from pfi_rag.layout import InvalidClientId, validate_client_id
        from pfi_rag.probes import SUITES, ProbeContext, run_suite
        from pfi_rag.probes.history import HistoryError
        from pfi_rag.probes.report import write_report

        cfg = config_from(ctx)
        if suite not in SUITES:
            fail(f"--suite {suite!r} is not one of: {', '.join(SUITES)}")
        chosen = [c.strip() for item in clients or [] for c in item.split(",") if c.strip()] or None
        try:
            for client in chosen or []:
                validate_client_id(client)
        except InvalidClientId as exc:
            fail(str(exc))
        if out is not None and out.exists() and not out.is_dir():
            fail(f"--out {out} is a file; give a directory")
        try:
            context = ProbeContext(cfg)
        except ConfigError as exc:
            fail(str(exc))
        try:
            with console.status("running probes") as status:
                report = run_suite(
                    context,
                    suite=suite,
                    clients=chosen,
                    private=private,
                    on_step=lambda label: status.update(f"probe {label}"),
                )
        except (ValueError, HistoryError) as exc:
            fail(str(exc))
        finally:
            context.close()
        if out is not None:
            json_path, html_path = write_report(report, out)
        if as_json:
            print_json(report.as_dict())
        else:
            console.print(_summary_table(report))
            if report.private:
                console.print(
                    f"each client spent epsilon {cfg.probes.release_epsilon:g} at its ledger's delta "
                    "on this release; σ per metric in the table"
                )
            if out is not None:
                console.print(f"report: {json_path} and {html_path}")
        raise typer.Exit(report.exit_code)

    @app.command("calibrate-probes")
    def calibrate_probes(
        reports: list[Path] = typer.Argument(
            ..., help="report.json files of `pfi-rag probe --out` runs on healthy deployments."
        ),
        out: Path = typer.Option(..., "--out", help="TOML file to write (for probes.thresholds_file)."),
    ) -> None:
        """Set each probe's threshold to the worst value it reached on healthy reference runs."""
        import json

        from pfi_rag.probes.thresholds import calibrate, thresholds_toml
        from pfi_rag.storage import atomic_write_text

        loaded = []
        for path in reports:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                fail(f"{path}: not a readable report.json ({exc})")
            if not isinstance(data, dict) or not isinstance(data.get("probes"), list):
                fail(f"{path}: not a probe report (no 'probes' list); give `pfi-rag probe --out` output")
            loaded.append(data)
        calibrated = calibrate(loaded)
        if not calibrated:
            fail("no probe has a value in every report: run the same probes on each reference")
        if out.exists() and out.is_dir():
            fail(f"--out {out} is a directory; give a file name")
        atomic_write_text(out, thresholds_toml(calibrated, [str(p) for p in reports]))
        table = Table(title=f"thresholds from {len(loaded)} healthy run(s)")
        for column in ("probe", "metric", "fails when", "was", "false alarms at most"):
            table.add_column(column)
        for item in calibrated:
            side = ">" if item.fails_above else "<"
            table.add_row(
                item.probe,
                item.metric,
                f"{side} {item.threshold:.4g}",
                f"{side} {item.configured:g}",
                f"{item.false_alarm_bound:.0%}",
            )
        console.print(table)
        console.print(f"wrote {out}; use it with --set probes.thresholds_file={out}")
