"""Federation overhead and scale, measured in one run against a bare Flower round.

1. 10 clients, tiny model: pfi-rag's round wall time split into client compute (DP training,
   timed inside each client) and framework overhead, beside a bare Flower round (the same
   Grid messages and array sizes, clients that reply at once) to show Flower's own share.
2. 50 simulated clients, 10 sampled per round: time per round and peak memory (the launcher
   plus its Ray workers).

    .venv/bin/python bench/federation.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation as flower_run_simulation

from pfi_rag.config import load_config
from pfi_rag.data.synth import synthesize
from pfi_rag.federation.launcher import run_simulation
from pfi_rag.federation.protocol import ARRAYS, METRICS, UPDATE, from_array_record, to_array_record
from pfi_rag.federation.server import collect_round, wait_for_nodes
from pfi_rag.federation.strategies import shared_part
from pfi_rag.federation.task import fresh_adapter

REPO = Path(__file__).resolve().parent.parent
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"logging_level": 30}}


def bench_config(root: Path, clients: int, per_round: int | None, rounds: int):
    return load_config(
        overrides={
            "data_root": str(root),
            "models.generator": "tiny-random",
            "models.device": "cpu",
            "models.cache_dir": str(REPO / ".model-cache"),
            "privacy.local_steps": 2,
            "privacy.batch_size": 4,
            "privacy.max_seq_len": 48,
            "privacy.epsilon_per_round": 4.0,
            "privacy.epsilon_max": 1000.0,
            "federation.clients": clients,
            "federation.clients_per_round": per_round,
            "federation.rounds": rounds,
        }
    )


def bare_flower_rounds(cfg, rounds: int) -> list[float]:
    """Round wall times of Flower alone: same messages and array sizes, no training."""
    shared = shared_part(fresh_adapter(cfg)[2], cfg.federation.strategy)
    times: list[float] = []
    server, client = ServerApp(), ClientApp()

    @client.train()
    def echo(msg: Message, context: Context) -> Message:
        arrays = from_array_record(msg.content[ARRAYS])
        content = RecordDict({UPDATE: to_array_record(arrays), METRICS: MetricRecord({"num-examples": 1.0})})
        return Message(content, reply_to=msg)

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        node_ids = wait_for_nodes(grid, cfg.federation.clients, 60)
        names = {n: f"client-{i:02d}" for i, n in enumerate(node_ids)}
        for round_number in range(1, rounds + 1):
            started = time.perf_counter()
            collect_round(grid, round_number, node_ids, names, shared, cfg)
            times.append(time.perf_counter() - started)

    flower_run_simulation(
        server_app=server, client_app=client, num_supernodes=cfg.federation.clients, backend_config=BACKEND
    )
    return times


class PeakMemory:
    """Peak RSS of this process and all its children (Ray's workers), sampled every 0.2 s."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def pfi_rounds(cfg):  # -> list[federation.records.RoundRecord]
    return run_simulation(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root10 = Path(tmp) / "ten"
        synthesize(root10, clients=10, seed=0)
        cfg10 = bench_config(root10, 10, None, args.rounds)
        bare = bare_flower_rounds(cfg10, args.rounds)
        records = pfi_rounds(cfg10)
        print(f"== 10 clients, tiny model, {args.rounds} rounds (2 cores: 2 clients train at a time)")
        print(
            f"bare Flower round (no training), median: {statistics.median(bare):.2f} s  all: "
            + ", ".join(f"{t:.2f}" for t in bare)
        )
        for record in records:
            compute = [m.train_seconds for m in record.metrics.values()]
            # Clients run 2 at a time: the compute on the critical path is about sum / 2.
            critical = sum(compute) / 2
            overhead = record.seconds - critical
            print(
                f"round {record.round}: wall {record.seconds:.2f} s, client compute "
                f"sum {sum(compute):.2f} s (max {max(compute):.2f}), critical path ~{critical:.2f} s, "
                f"overhead ~{overhead:.2f} s"
            )
        overheads = [
            r.seconds - sum(m.train_seconds for m in r.metrics.values()) / 2 for r in records
        ]
        print(
            f"median framework + aggregation overhead per round: {statistics.median(overheads):.2f} s "
            f"(target <= 1 s); bare Flower share: {statistics.median(bare):.2f} s"
        )

        root50 = Path(tmp) / "fifty"
        synthesize(root50, clients=50, seed=0)
        cfg50 = bench_config(root50, 50, 10, args.rounds)
        with PeakMemory() as memory:
            started = time.perf_counter()
            records50 = pfi_rounds(cfg50)
            total = time.perf_counter() - started
        per_round = [r.seconds for r in records50]
        print(f"== 50 clients, 10 sampled per round, {args.rounds} rounds")
        print(
            f"per round: median {statistics.median(per_round):.2f} s (all: "
            + ", ".join(f"{t:.2f}" for t in per_round)
            + f"); whole run incl. Ray start {total:.1f} s"
        )
        print(f"peak memory (launcher + Ray workers): {memory.peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
