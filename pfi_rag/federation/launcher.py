"""`pfi-rag federate`: run the Flower apps on Flower's simulation runtime over the data root's clients."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

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

    The rounds run on Flower's simulation runtime behind a private SuperLink
    (:mod:`pfi_rag.federation.simulation`); ``on_round(record)`` runs here after each round, before
    the next one starts. ``client_mods``: Flower client mods, by ``module:attribute`` name or as
    module-level functions (the ClientApps run in other processes, which import them by name).

    Raises :class:`~pfi_rag.federation.server.FederationFailed` when a round has too few results
    (with the ServerApp's message), or when Flower's processes did not run the federation to its
    end (the message names the logs, ``federation/simulation/logs/``).
    """
    from pfi_rag.federation.checkpoint import load_checkpoint
    from pfi_rag.federation.processes import FlowerProcessFailed
    from pfi_rag.federation.server import FederationFailed
    from pfi_rag.federation.simulation import run_apps

    mods = [mod_name(mod) for mod in client_mods or []]
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
    checkpoint = load_checkpoint(cfg.data_root)
    if checkpoint is not None and checkpoint.round >= cfg.federation.rounds:
        logger.info("all %d rounds already done", cfg.federation.rounds)
        return []  # what the ServerApp would find, without starting Flower for it
    # The server waits for this many nodes: the participants, one virtual SuperNode each. The
    # apps run elsewhere and read this config from a file: every path in it is absolute.
    cfg = cfg.model_copy(deep=True)
    cfg.data_root = Path(cfg.data_root).resolve()
    cfg.federation.clients = len(clients)
    try:
        run = run_apps(cfg, clients, client_mods=mods, on_round=on_round)
    except FlowerProcessFailed as exc:
        raise FederationFailed(f"Flower did not run the federation to its end: {exc}") from exc
    error = run.error
    if error is not None:
        if error["type"] == "FederationFailed":
            raise FederationFailed(error["message"])
        raise FederationFailed(
            f"the ServerApp failed ({error['type']}: {error['message']}); logs in {run.log_dir}"
        )
    return run.records


def mod_name(mod: Callable | str) -> str:
    """``module:attribute`` of a client mod, checked to import as the same object."""
    from pfi_rag.federation.client_app import resolve_mod

    if isinstance(mod, str):
        name = mod
    else:
        name = f"{getattr(mod, '__module__', '')}:{getattr(mod, '__qualname__', '')}"
    try:
        found = resolve_mod(name)
    except (ImportError, AttributeError, ValueError):
        found = None
    if found is None or (not isinstance(mod, str) and found is not mod):
        raise TypeError(
            f"client mod {mod!r} cannot be found by name in another process: give a module-level "
            "function, or its 'module:attribute' name"
        )
    return name


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
