"""Flower ClientApp: handlers only; the work is in :mod:`pfi_rag.federation.task`.

A node learns which client it is from its node config: ``client-id`` (deployment, one
SuperNode per client) or ``partition-id`` (simulation: the n-th client under the data root).

A failing train handler never raises: Flower would forward ``str(exc)`` to the server, and an
exception about a record may quote the record. It replies with a code from
:data:`~pfi_rag.federation.task.FAILURE_CODES` and writes the traceback to the client's own log.
With ``federation.reply_after_s`` every train reply (update, sat-out or failure) waits until
that many seconds after the message arrived, so its timing says nothing about the round's work.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import logging
import time
import traceback
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pfi_rag.config import Config, load_config
from pfi_rag.federation.protocol import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    FAILED,
    SAT_OUT,
    SERVER_ROUND,
    from_array_record,
    identity_reply,
    no_update_reply,
    train_reply,
)
from pfi_rag.federation.run_dir import read_participants
from pfi_rag.layout import client_log_file, list_clients, validate_client_id

logger = logging.getLogger(__name__)


def client_id_of(context: Context, cfg: Config, participants: list[str] | None = None) -> str:
    node_config = context.node_config
    if CLIENT_ID in node_config:
        return validate_client_id(str(node_config[CLIENT_ID]))
    run_dir = context.run_config.get("run-dir")
    if participants is None and run_dir:
        participants = read_participants(Path(str(run_dir)))  # the launcher's plan
    clients = list_clients(cfg.data_root) if participants is None else participants
    partition = int(node_config["partition-id"])
    if partition >= len(clients):
        raise RuntimeError(f"partition {partition} has no client: {cfg.data_root} holds {len(clients)}")
    return clients[partition]


def client_of(context: Context) -> str:
    """The client this node serves, for a client mod: from the node config (a deployment) or the
    launcher's participants (a simulation)."""
    return client_id_of(context, config_from_context(context))


def config_from_context(context: Context) -> Config:
    """For `flwr run` and SuperNodes: the run config names a pfi-rag TOML file and data root."""
    overrides = {}
    data_root = context.node_config.get("data-root") or context.run_config.get("data-root")
    if data_root:
        overrides["data_root"] = str(data_root)
    config_file = context.run_config.get("config-file") or None
    return load_config(config_file, overrides)


def make_client_app(
    cfg: Config | None = None, mods: list | None = None, participants: list[str] | None = None
) -> ClientApp:
    """A ClientApp bound to ``cfg`` (the launcher), or reading it from each run's context.

    ``mods`` are Flower client mods (they see every message in and reply out), e.g. Flower's
    DP mods or an audit that records what leaves the client; the run config's ``client-mods``
    names more (:func:`named_mods`). ``participants``: the simulation's clients in partition
    order (default: the run directory's ``participants.json``, else every client under the data root).
    """
    app = ClientApp(mods=[*(mods or []), named_mods])

    def resolve(context: Context) -> Config:
        return cfg if cfg is not None else config_from_context(context)

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        client_id = client_id_of(context, resolve(context), participants)
        return Message(identity_reply(client_id), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # Imported here: the ServerApp's process imports this module too, and needs no torch.
        from pfi_rag.federation.task import SatOut, failure_code, train_round

        arrived = time.monotonic()
        client_id = run_cfg = None
        try:
            run_cfg = resolve(context)
            client_id = client_id_of(context, run_cfg, participants)
            server_round = int(msg.content[CONFIG][SERVER_ROUND])
            outcome = train_round(run_cfg, client_id, from_array_record(msg.content[ARRAYS]), server_round)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code; details stay local
            code = failure_code(exc)
            where = log_locally(run_cfg if client_id else None, client_id, code)
            logger.warning("this client's round failed (%s); details in %s", code, where)
            content = no_update_reply(FAILED, code)
        else:
            if isinstance(outcome, SatOut):
                content = no_update_reply(SAT_OUT, outcome.reason)
            else:
                content = train_reply(outcome.update, outcome.metrics, outcome.privacy)
        if run_cfg is not None:
            hold_reply(run_cfg, client_id, arrived)
        return Message(content, reply_to=msg)

    return app


def named_mods(msg: Message, context: Context, call_next):
    """A Flower client mod that runs the mods the run config names, in order, around the handler.

    ``client-mods`` holds ``module:attribute`` names separated by spaces (each attribute a Flower
    mod): a launcher in another process cannot hand mods over as objects, but it can name them.
    """
    names = str(context.run_config.get("client-mods") or "").split()
    chain = call_next
    for mod in reversed([resolve_mod(name) for name in names]):
        chain = functools.partial(_call_mod, mod, chain)
    return chain(msg, context)


def _call_mod(mod, call_next, msg: Message, context: Context) -> Message:
    return mod(msg, context, call_next)


@functools.cache
def resolve_mod(name: str):
    """The object ``module:attribute`` names (a client mod), imported once per process."""
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"client-mods: {name!r} is not module:attribute")
    return getattr(importlib.import_module(module), attribute)


def hold_reply(cfg: Config, client_id: str | None, arrived: float) -> None:
    """Wait until ``federation.reply_after_s`` after ``arrived`` (``time.monotonic()``); a round
    that took longer is noted in the client's own log, where its operator can raise the setting."""
    deadline = cfg.federation.reply_after_s
    if deadline is None:
        return
    left = arrived + deadline - time.monotonic()
    if left > 0:
        time.sleep(left)
    elif client_id is not None:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        path = client_log_file(cfg.data_root, client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(
                f"{stamp} reply_late: the round took {deadline - left:.1f} s, past "
                f"federation.reply_after_s = {deadline:g}; its timing was not hidden\n"
            )


def log_locally(cfg: Config | None, client_id: str | None, code: str) -> str:
    """Append the current exception's traceback to the client's own log; returns where it went."""
    text = f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} {code}\n{traceback.format_exc()}\n"
    if cfg is None or client_id is None:
        logger.debug("%s", text)  # no client directory known: the local process log only
        return "this process's debug log"
    path = client_log_file(cfg.data_root, client_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


app = make_client_app()

__all__ = ["app", "make_client_app", "named_mods"]
