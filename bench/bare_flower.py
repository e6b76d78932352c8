"""A bare Flower app for bench/federation.py: pfi-rag's round messages and array sizes, clients
that reply at once (no training), run through the same launcher and simulation runtime.

The ServerApp leaves each round's start and end (``time.time()``) in ``bare-rounds.json`` in the
launcher's run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pfi_rag.federation.client_app import config_from_context
from pfi_rag.federation.protocol import ARRAYS, METRICS, UPDATE, from_array_record, to_array_record
from pfi_rag.federation.server import collect_round, wait_for_nodes
from pfi_rag.federation.strategies import shared_part
from pfi_rag.federation.task import fresh_adapter

ROUNDS_FILE = "bare-rounds.json"

server = ServerApp()
client = ClientApp()


@client.train()
def echo(msg: Message, context: Context) -> Message:
    arrays = from_array_record(msg.content[ARRAYS])
    content = RecordDict({UPDATE: to_array_record(arrays), METRICS: MetricRecord({"num-examples": 1.0})})
    return Message(content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_context(context)
    shared = shared_part(fresh_adapter(cfg)[2], cfg.federation.strategy)
    node_ids = wait_for_nodes(grid, cfg.federation.clients, 60)
    names = {n: f"client-{i:02d}" for i, n in enumerate(node_ids)}
    rounds = []
    for round_number in range(1, cfg.federation.rounds + 1):
        started = time.time()
        collect_round(grid, round_number, node_ids, names, shared, cfg)
        rounds.append({"start": started, "end": time.time()})
    (Path(str(context.run_config["run-dir"])) / ROUNDS_FILE).write_text(json.dumps(rounds))
