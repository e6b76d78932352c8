"""`pfi-rag federate`: run the Flower apps on the simulation engine over the data root's clients."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from pfi_rag.config import Config
from pfi_rag.federation.records import (
    ClientRow,
    FederationSummary,
    RoundRecord,
    RoundRow,
    read_round_records,
    write_summary,
)
from pfi_rag.layout import list_clients

logger = logging.getLogger(__name__)


def plan_participants(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """The clients that train (every one under the data root with documents to train on, by id,
    capped at ``federation.clients`` when set) and, for each one left out, why and what to do."""
    from pfi_rag.data.corpus import CorpusError, load_corpus, require_training_data

    chosen: list[str] = []
    left_out: dict[str, str] = {}
    for client in list_clients(cfg.data_root):
        try:
            require_training_data(load_corpus(cfg.data_root, client, held_out_share=cfg.data.held_out_share))
        except CorpusError as exc:
            left_out[client] = str(exc)
            continue
        except ValueError:
            pass  # unreadable local data: the client joins and fails its round, which says so
        chosen.append(client)
    cap = cfg.federation.clients
    if cap is not None and len(chosen) > cap:
        for client in chosen[cap:]:
            left_out[client] = (
                f"federation.clients = {cap} takes the first {cap} clients with data; "
                "unset it (or raise it) to train every client"
            )
        chosen = chosen[:cap]
    return chosen, left_out


def run_simulation(
    cfg: Config,
    on_round: Callable[[RoundRecord], None] | None = None,
    client_mods: list | None = None,
    on_left_out: Callable[[dict[str, str]], None] | None = None,
) -> list[RoundRecord]:
    """Run (or resume) ``cfg.federation.rounds`` rounds with one virtual SuperNode per client
    that has data (:func:`plan_participants`); ``on_left_out`` hears who is left out and why.

    Raises :class:`~pfi_rag.federation.server.FederationFailed` when a round has too few
    results: the simulation engine itself would log the error and carry on.
    """
    # The simulation engine warns that run_simulation is deprecated in favour of `flwr run`;
    # `flwr run .` works too (pyproject's [tool.flwr.app]), but the launcher needs the config
    # object and the round records in-process.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation as flower_run_simulation

    from pfi_rag.federation.client_app import make_client_app
    from pfi_rag.federation.server_app import make_server_app

    clients, left_out = plan_participants(cfg)
    for client, reason in left_out.items():
        logger.info("leaving client %s out of the federation: %s", client, reason)
    if on_left_out is not None and left_out:
        on_left_out(left_out)
    if not clients:
        reasons = "; ".join(f"{c}: {why}" for c, why in left_out.items())
        raise ValueError(
            f"no client in {cfg.data_root} has documents to train on"
            + (f" ({reasons})" if reasons else ": add some with `pfi-rag ingest --client NAME DIR/`")
        )
    # The server waits for this many nodes: the participants, one virtual SuperNode each.
    cfg = cfg.model_copy(deep=True)
    cfg.federation.clients = len(clients)
    records: list[RoundRecord] = []
    errors: list[BaseException] = []

    def collect(done: list[RoundRecord]) -> None:
        records.extend(done)

    server_app = make_server_app(cfg, on_done=collect, on_round=on_round, on_error=errors.append)
    client_app = make_client_app(cfg, mods=client_mods, participants=clients)
    try:
        flower_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(clients),
            backend_config={
                # One CPU per client: on 2 cores, two clients train at a time.
                # models.device=cuda: the clients share one GPU (Ray hides the GPU from a worker
                # that asks for none, and the model's load would then find no CUDA device).
                "client_resources": {
                    "num_cpus": 1,
                    "num_gpus": 1.0 / len(clients) if cfg.models.device == "cuda" else 0.0,
                },
                # Workers' output (library warnings, Flower's actor shutdown lines) is forwarded
                # unless Flower's console is set to errors only, as the CLI does by default
                # (pfi_rag/cli/output.py); a worker's failure still reaches the server as a reply.
                "init_args": {"logging_level": logging.WARNING, "log_to_driver": _forward_worker_output()},
            },
        )
    except Exception:
        if not errors:
            raise
    if errors:
        raise errors[0]
    return records


def _forward_worker_output() -> bool:
    return os.environ.get("FLWR_LOG_LEVEL", "").upper() not in ("ERROR", "CRITICAL")


def loss_caption(summary: FederationSummary) -> str:
    """What the summary's losses are, for a table under them."""
    if summary.round_metrics == "exact":
        return "losses as the clients sent them: exact (privacy.round_metrics = exact, not private)"
    return (
        "losses as the clients released them, +- the noise's std: with few records one client's "
        "loss is mostly noise (privacy.round_metrics)"
    )


def show_loss(row: ClientRow, key: str) -> str:
    """A row's ``loss_before`` or ``loss_after``, with its noise std when released privately."""
    value, std = getattr(row, key), row.loss_std
    if value is None:
        return "-"
    return f"{value:.3g}" if std is None else f"{value:.3g} ± {std:.2g}"


def summarize(cfg: Config, records: list[RoundRecord] | None = None) -> FederationSummary:
    """Per-client and per-round summary of every round on disk, saved as ``federation/summary.json``."""
    from pfi_rag.privacy import PrivacyLedger

    all_records = read_round_records(cfg.data_root) if records is None else records
    rounds = [
        RoundRow(
            round=r.round,
            participants=len(r.participants),
            results=len(r.results),
            failures=len(r.failures),
            sat_out=len(r.sat_out),
            aggregate_norm=r.aggregate_norm,
            server_epsilon=r.server_dp.epsilon if r.server_dp is not None else None,
            status=r.status,
        )
        for r in all_records
    ]
    per_client: dict[str, ClientRow] = {}
    for r in all_records:
        for client, metrics in r.metrics.items():
            entry = per_client.setdefault(client, ClientRow(loss_before=metrics.loss_before))
            entry.rounds += 1
            entry.loss_after = metrics.loss_after
            entry.loss_std = metrics.loss_std  # None: exact metrics
            entry.update_norm = r.updates[client].norm
    for client, entry in per_client.items():
        entry.epsilon = PrivacyLedger.open(cfg.data_root, client, cfg.privacy).epsilon_spent
    summary = FederationSummary(
        strategy=cfg.federation.strategy,
        aggregation=cfg.federation.aggregation,
        round_metrics=cfg.privacy.round_metrics,  # the losses: noised ("private") or exact
        rounds=rounds,
        clients=per_client,
    )
    write_summary(cfg.data_root, summary)
    return summary
