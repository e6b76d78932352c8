"""Federation overhead and scale, measured in one run against a bare Flower round.

1. 10 clients, tiny model: pfi-rag's round wall time split into client compute (DP training,
   timed inside each client) and framework overhead, beside a bare Flower round (the same
   Grid messages and array sizes, clients that reply at once) to show Flower's own share.
2. 50 simulated clients, 10 sampled per round: time per round and peak memory (the launcher
   plus its Ray workers).
3. The default model (SmolLM2-135M), 4 clients at the default privacy settings: each round's
   wall time beside the clients' DP training time (Opacus set-up and steps, from the per-phase
   timings each client logs locally), their ratio, and where the rest of a round goes.

    .venv/bin/python bench/federation.py [--rounds 3] [--only overhead|scale|default-model]
"""

from __future__ import annotations

import argparse
import json
import os
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
from pfi_rag.layout import client_timings_file, list_clients

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
            "privacy.round_metrics": "exact",  # adds each client's train-seconds to its reply
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


DP_PHASES = ("dp_setup", "dp_steps")  # the DP training itself: Opacus's wrapping and the steps


def default_model_rounds(
    root: Path, rounds: int, *, steps: int | None, sample: int | None, demo: bool, exact: bool
) -> None:
    """Section 3: SmolLM2-135M, 4 clients, default privacy settings (``steps`` overrides
    local_steps); one torch thread per worker, two workers on 2 cores, as in the demo."""
    synthesize(root, clients=4, seed=0)
    overrides = {
        "data_root": str(root),
        "models.device": "cpu",
        "models.cache_dir": str(REPO / ".model-cache"),
        "models.threads": 1,
        "privacy.epsilon_max": 1000.0,
        "federation.clients": 4,
        "federation.rounds": rounds,
    }
    if demo:  # the demo's (pfi_rag/demo.py FULL) shorter rounds
        overrides |= {"privacy.local_steps": 3, "privacy.batch_size": 4, "privacy.max_seq_len": 64}
    if steps is not None:
        overrides["privacy.local_steps"] = steps
    if sample is not None:
        overrides["privacy.round_metrics_sample"] = sample
    if exact:  # every record evaluated, before and after (the evaluation rounds did before the sample)
        overrides["privacy.round_metrics"] = "exact"
    cfg = load_config(overrides=overrides)
    started = time.perf_counter()
    records = pfi_rounds(cfg)
    total = time.perf_counter() - started
    timings = {  # round -> [(client, entry)]
        r.round: [] for r in records
    }
    for client in list_clients(root):
        path = client_timings_file(root, client)
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            timings.setdefault(entry["round"], []).append((client, entry))
    p = cfg.privacy
    print(
        f"== default model {cfg.models.generator}, 4 clients, {rounds} rounds, {p.local_steps} DP steps "
        f"a round, batch {p.batch_size}, {p.max_seq_len} tokens, round-metric sample "
        f"{p.round_metrics_sample if p.round_metrics == 'private' else 'none (exact: every record)'} "
        "(2 workers, 1 torch thread each)"
    )
    ratios = []
    for record in records:
        entries = timings[record.round]
        per_worker: dict[int, list[dict]] = {}
        for _, entry in entries:
            per_worker.setdefault(entry["pid"], []).append(entry)
        # The clients one worker ran are sequential: the round waits for the busiest worker.
        dp = max(sum(e["phases"].get(k, 0.0) for e in es for k in DP_PHASES) for es in per_worker.values())
        busy = max(sum(e["total"] for e in es) for es in per_worker.values())
        phases: dict[str, float] = {}
        for _, entry in entries:
            for phase, seconds in entry["phases"].items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        ratios.append(record.seconds / dp)
        print(
            f"round {record.round}: wall {record.seconds:.1f} s, clients' DP training {dp:.1f} s "
            f"(busiest worker), ratio {record.seconds / dp:.2f}; busiest worker's whole client work "
            f"{busy:.1f} s, so {record.seconds - busy:.1f} s outside clients; workers {len(per_worker)}"
        )
        print("  summed over clients: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(
        f"median ratio wall / DP training: {statistics.median(ratios):.2f} (target <= 1.25); "
        f"whole run {total:.1f} s, of which before round 1 (Ray, workers, server model) "
        f"{total - sum(r.seconds for r in records):.1f} s; load {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("overhead", "scale", "default-model"))
    parser.add_argument("--steps", type=int, help="DP steps per client round (default-model section)")
    parser.add_argument("--sample", type=int, help="privacy.round_metrics_sample (default-model section)")
    parser.add_argument("--demo", action="store_true", help="the demo's 3 steps, batch 4, 64 tokens")
    parser.add_argument("--exact", action="store_true", help="exact metrics: every record evaluated")
    parser.add_argument("--compare", action="store_true", help="--exact, then the sample, in one run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "default-model"):
            # --compare: first every record evaluated before and after training (what a round
            # did before the fixed-size sample), then the sample, in one run of this script.
            for exact in (True, False) if args.compare else (args.exact,):
                default_model_rounds(
                    Path(tmp) / ("default-exact" if exact else "default"),
                    args.rounds,
                    steps=args.steps,
                    sample=args.sample,
                    demo=args.demo,
                    exact=exact,
                )
        if args.only in (None, "overhead"):
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
            overheads = [r.seconds - sum(m.train_seconds for m in r.metrics.values()) / 2 for r in records]
            print(
                f"median framework + aggregation overhead per round: {statistics.median(overheads):.2f} s "
                f"(target <= 1 s); bare Flower share: {statistics.median(bare):.2f} s"
            )

        if args.only in (None, "scale"):
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
