"""`pfi-rag federate|deploy`: the Flower training launcher (simulation and real processes)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pfi_rag.cli.common import config_from, console, fail, print_json

EXIT_FEDERATION_FAILED = 1


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def print_summary(summary) -> None:  # a federation.records.FederationSummary
    from pfi_rag.federation.launcher import loss_caption, show_loss

    clients = Table(
        title=f"clients ({summary.strategy}, aggregation {summary.aggregation})",
        caption=loss_caption(summary),
    )
    for column in ("client", "rounds joined", "epsilon spent", "loss before", "loss after", "update norm"):
        clients.add_column(column)
    for client, row in sorted(summary.clients.items()):
        clients.add_row(
            client,
            str(row.rounds),
            _fmt(row.epsilon),
            show_loss(row, "loss_before"),
            show_loss(row, "loss_after"),
            _fmt(row.update_norm),
        )
    console.print(clients)
    rounds = Table(title="rounds")
    for column in ("round", "participants", "results", "failures", "sat out", "aggregate norm", "server ε"):
        rounds.add_column(column)
    for row in summary.rounds:
        rounds.add_row(
            str(row.round),
            str(row.participants),
            str(row.results),
            str(row.failures),
            str(row.sat_out),
            _fmt(row.aggregate_norm),
            _fmt(row.server_epsilon),
        )
    console.print(rounds)


def _print_round(record) -> None:  # a federation.records.RoundRecord
    failed = ", ".join(f.client for f in record.failures) or "none"
    sat = ", ".join(s.client for s in record.sat_out) or "none"
    console.print(
        f"round {record.round}: {len(record.results)} results, {len(record.failures)} failures "
        f"({failed}), sat out: {sat}, aggregate norm {record.aggregate_norm:.4g}, "
        f"{record.seconds:.1f} s"
    )


SYNTH_CLIENTS = 4  # what `federate` synthesises into an empty data root unless --clients says


def _prepare(cfg, clients: int | None) -> None:
    """Use the data root's clients, or synthesise them when it has none."""
    from pfi_rag.data.synth import synthesize
    from pfi_rag.layout import list_clients

    existing = list_clients(cfg.data_root)
    if not existing:
        clients = clients or SYNTH_CLIENTS
        console.print(f"no clients in {cfg.data_root}: synthesising {clients}")
        synthesize(cfg.data_root, clients=clients, seed=cfg.seed)
    elif clients is not None and len(existing) < clients:
        fail(f"{cfg.data_root} holds {len(existing)} clients, fewer than --clients {clients}")


def register(app: typer.Typer) -> None:
    @app.command("federate")
    def federate(
        ctx: typer.Context,
        clients: int = typer.Option(
            None, "--clients", min=1, help="Most clients to train (default: every client with documents)."
        ),
        rounds: int = typer.Option(None, "--rounds", min=1, help="Rounds (default: federation.rounds)."),
        strategy: str = typer.Option(None, "--strategy", help="fedavg | fedsa | ditto."),
        aggregation: str = typer.Option(None, "--aggregation", help="fedavg | median | trimmed_mean."),
        epsilon: float = typer.Option(
            None, "--epsilon", help="Total epsilon per client for this run, spread evenly over the rounds."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Run federated DP personalization on Flower's simulation runtime (resumes after a crash)."""
        from pfi_rag.federation.launcher import plan_participants, run_simulation, summarize
        from pfi_rag.federation.server import FederationFailed
        from pfi_rag.layout import simulation_log_dir, summary_file

        overrides = {
            "federation.clients": clients,
            "federation.rounds": rounds,
            "federation.strategy": strategy,
            "federation.aggregation": aggregation,
        }
        if epsilon is not None:
            if not epsilon > 0:
                fail("--epsilon must be positive")
            planned_rounds = rounds or config_from(ctx).federation.rounds
            overrides |= {
                "privacy.epsilon_max": epsilon,
                "privacy.epsilon_per_round": epsilon / planned_rounds,
            }
        cfg = config_from(ctx, **overrides)
        _prepare(cfg, cfg.federation.clients)
        participants, left_out = plan_participants(cfg)
        for client, reason in left_out.items():
            console.print(f"[yellow]leaving out {client}:[/yellow] {reason}", highlight=False)
        console.print(
            f"federating {len(participants)} clients for {cfg.federation.rounds} rounds "
            f"({cfg.federation.strategy}, ε ≤ {cfg.privacy.epsilon_max} per client, "
            f"{cfg.privacy.epsilon_per_round} per round) in {cfg.data_root}"
        )
        flower_logs = simulation_log_dir(cfg.data_root)
        try:
            run_simulation(cfg, on_round=_print_round)
        except FederationFailed as exc:
            fail(f"{exc}\nFlower's and Ray's output: {flower_logs}", code=EXIT_FEDERATION_FAILED)
        except ValueError as exc:
            fail(str(exc))
        summary = summarize(cfg)
        if json_out:
            print_json(summary.model_dump(mode="json"))
        else:
            print_summary(summary)
            console.print(f"summary: {summary_file(cfg.data_root)}")
            console.print(
                f"Flower's and Ray's output: {flower_logs} (--verbose prints it as it comes)", soft_wrap=True
            )

    deploy_app = typer.Typer(help="Run the federation as real SuperLink/SuperNode processes.")
    app.add_typer(deploy_app, name="deploy")

    @deploy_app.command("local")
    def deploy_local(
        ctx: typer.Context,
        clients: int = typer.Option(3, "--clients", min=1, help="SuperNodes to start, one per client."),
        rounds: int = typer.Option(None, "--rounds", min=1, help="Rounds (default: federation.rounds)."),
        tls: bool = typer.Option(
            False, "--tls", help="TLS on every connection and SuperNode authentication (fresh CA, node keys)."
        ),
    ) -> None:
        """Start a SuperLink and one SuperNode per client on loopback, run the federation, stop them."""
        from pfi_rag.federation.deploy import DeploymentFailed, run_deployment
        from pfi_rag.federation.launcher import summarize

        cfg = config_from(ctx, **{"federation.rounds": rounds})
        _prepare(cfg, clients)
        security = "TLS, SuperNode authentication" if tls else "plaintext"
        console.print(f"starting a SuperLink and {clients} SuperNodes on 127.0.0.1 ({security})")
        try:
            status = run_deployment(cfg, clients, tls=tls)
        except DeploymentFailed as exc:
            fail(str(exc), code=EXIT_FEDERATION_FAILED)
        except ValueError as exc:
            fail(str(exc))
        console.print(
            f"run {status['run-id']} {status['status']} in {status['elapsed']:.1f} s; logs: {status['logs']}"
        )
        print_summary(summarize(cfg))

    @deploy_app.command("keys")
    def deploy_keys(
        out: Path = typer.Option(..., "--out", help="Folder to create (one sub-folder per host to copy)."),
        superlink_host: list[str] = typer.Option(
            ..., "--superlink-host", help="Name or IP the SuperNodes reach the SuperLink at (repeatable)."
        ),
        clients: str = typer.Option(..., "--clients", help="Comma-separated client ids, one SuperNode each."),
        port: int = typer.Option(9092, "--port", min=1, max=65535, help="The SuperLink's port."),
    ) -> None:
        """Make a CA, the SuperLink's TLS certificate and each SuperNode's key pair for a multi-host run."""
        from pfi_rag.federation.deploy import write_operator_kit
        from pfi_rag.layout import InvalidClientId

        ids = [c.strip() for c in clients.split(",") if c.strip()]
        try:
            keys = write_operator_kit(out, superlink_hosts=superlink_host, clients=ids, port=port)
        except (ValueError, InvalidClientId, FileExistsError) as exc:
            fail(str(exc))
        console.print(f"certificate authority: {keys.root / 'ca'} (keep ca.key offline; copy none of it)")
        console.print(f"copy to the SuperLink host: {keys.superlink_dir()}")
        for client in ids:
            console.print(f"copy to {client}'s host: {keys.supernode_dir(client)}")
        console.print("each folder's README.txt holds the commands for that host")
