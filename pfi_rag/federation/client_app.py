"""Flower ClientApp: handlers only; the work is in :mod:`pfi_rag.federation.task`.

A node learns which client it is from its node config: ``client-id`` (deployment, one
SuperNode per client) or ``partition-id`` (simulation: the n-th client under the data root).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pfi_rag.config import Config, load_config
from pfi_rag.federation.server import (
    ARRAYS,
    CONFIG,
    METRICS,
    PRIVACY,
    UPDATE,
    from_array_record,
    to_array_record,
)
from pfi_rag.federation.task import SatOut, train_round
from pfi_rag.storage import list_clients, validate_client_id


def client_id_of(context: Context, cfg: Config) -> str:
    node_config = context.node_config
    if "client-id" in node_config:
        return validate_client_id(str(node_config["client-id"]))
    clients = list_clients(cfg.data_root)
    partition = int(node_config["partition-id"])
    if partition >= len(clients):
        raise RuntimeError(f"partition {partition} has no client: {cfg.data_root} holds {len(clients)}")
    return clients[partition]


def config_from_context(context: Context) -> Config:
    """For `flwr run` and SuperNodes: the run config names a pfi-rag TOML file and data root."""
    overrides = {}
    data_root = context.node_config.get("data-root") or context.run_config.get("data-root")
    if data_root:
        overrides["data_root"] = str(data_root)
    config_file = context.run_config.get("config-file") or None
    return load_config(config_file, overrides)


def make_client_app(cfg: Config | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` (the launcher), or reading it from each run's context.

    ``mods`` are Flower client mods (they see every message in and reply out), e.g. Flower's
    DP mods or an audit that records what leaves the client.
    """
    app = ClientApp(mods=mods or [])

    def resolve(context: Context) -> Config:
        return cfg if cfg is not None else config_from_context(context)

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        client_id = client_id_of(context, resolve(context))
        return Message(RecordDict({CONFIG: ConfigRecord({"client-id": client_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = resolve(context)
        client_id = client_id_of(context, run_cfg)
        server_round = int(msg.content[CONFIG]["server-round"])
        outcome = train_round(run_cfg, client_id, from_array_record(msg.content[ARRAYS]), server_round)
        if isinstance(outcome, SatOut):
            content = RecordDict({PRIVACY: ConfigRecord({"sat-out": True, "reason": outcome.reason})})
            return Message(content, reply_to=msg)
        content = RecordDict(
            {
                UPDATE: to_array_record(outcome.update),
                METRICS: MetricRecord(outcome.metrics),
                PRIVACY: ConfigRecord(outcome.privacy),
            }
        )
        return Message(content, reply_to=msg)

    return app


app = make_client_app()

__all__ = ["app", "make_client_app"]
