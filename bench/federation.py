"""Federation overhead and scale, measured in one run against a bare Flower round.

1. 10 clients, tiny model: pfi-rag's round wall time split into client compute (DP training,
   timed inside each client) and framework overhead, beside a bare Flower round (the same
   Grid messages and array sizes, clients that reply at once) to show Flower's own share.
2. 50 simulated clients, 10 sampled per round: time per round and peak memory (the launcher
   plus its Ray workers).
3. The default model (SmolLM2-135M), 4 clients at the default privacy settings: each round's
   wall time beside the clients' DP training time (Opacus set-up and steps, from the per-phase
   timings each client logs locally), their ratio, and where the rest of a round goes.
4. Start-up: launches of 4 clients for 1 round, each timed from the launcher's call (its private
   SuperLink's start) to round 1's start.
Every section runs through the launcher (a private SuperLink, `flwr run`, Flower's simulation
runtime); the start-up of each launch is printed at the end.

    .venv/bin/python bench/federation.py [--rounds 3] [--only startup|overhead|scale|default-model]
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

import bare_flower  # bench/bare_flower.py: this script's directory is on the import path
import psutil

from pfi_rag.config import load_config
from pfi_rag.data.synth import synthesize
from pfi_rag.federation.launcher import run_simulation
from pfi_rag.federation.simulation import run_apps
from pfi_rag.layout import client_timings_file, list_clients, round_record_file, simulation_dir

REPO = Path(__file__).resolve().parent.parent


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


def bare_flower_rounds(cfg, rounds: int) -> tuple[list[float], float]:
    """Round wall times of Flower alone (same messages and array sizes, no training), through the
    same launcher path as pfi-rag's rounds; and the start-up: SuperLink start to round 1's start."""
    cfg = cfg.model_copy(deep=True)
    cfg.data_root = Path(cfg.data_root).resolve()
    cfg.federation.rounds = rounds
    run = run_apps(cfg, list_clients(cfg.data_root), apps=("bare_flower:server", "bare_flower:client"))
    stamps = json.loads((simulation_dir(cfg.data_root) / bare_flower.ROUNDS_FILE).read_text())
    return [r["end"] - r["start"] for r in stamps], stamps[0]["start"] - run.started_at


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


STARTUP: list[tuple[str, float]] = []  # (what ran, SuperLink start to round 1's start), per launch


def pfi_rounds(cfg, label: str = ""):  # -> list[federation.records.RoundRecord]
    """pfi-rag's rounds through the launcher; notes the launch's start-up in :data:`STARTUP`."""
    started = time.time()
    records = run_simulation(cfg)
    if records:
        # Round 1's record is written when it ends: its start is that moment less its duration.
        written = round_record_file(cfg.data_root, records[0].round).stat().st_mtime
        STARTUP.append((label, written - records[0].seconds - started))
    return records


def print_startup() -> None:
    """SuperLink start (the launcher's call) to round 1's start, per launch: Flower's SuperLink,
    `flwr run`, the simulation runtime, the ServerApp's imports and model, Ray and its workers."""
    for label, seconds in STARTUP:
        print(f"start-up, launcher call to round 1's start ({label}): {seconds:.1f} s")


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
    records = pfi_rounds(cfg, f"default model, {rounds} rounds")
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
        f"whole run {total:.1f} s, of which outside rounds (SuperLink, Ray, workers, server model) "
        f"{total - sum(r.seconds for r in records):.1f} s; load {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("startup", "overhead", "scale", "default-model"))
    parser.add_argument("--launches", type=int, default=3, help="launches in the start-up section")
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
        if args.only in (None, "startup"):
            print(f"== start-up: {args.launches} launches of 4 clients, tiny model, 1 round each")
            for launch in range(args.launches):
                root = Path(tmp) / f"startup-{launch}"
                synthesize(root, clients=4, seed=launch)
                started = time.perf_counter()
                (record,) = pfi_rounds(bench_config(root, 4, None, 1), f"4 clients, launch {launch + 1}")
                print(
                    f"launch {launch + 1}: whole run {time.perf_counter() - started:.1f} s, round 1 "
                    f"{record.seconds:.1f} s, start-up {STARTUP[-1][1]:.1f} s"
                )

        if args.only in (None, "overhead"):
            root10 = Path(tmp) / "ten"
            synthesize(root10, clients=10, seed=0)
            cfg10 = bench_config(root10, 10, None, args.rounds)
            bare, bare_startup = bare_flower_rounds(cfg10, args.rounds)
            records = pfi_rounds(cfg10, "10 clients, tiny model")
            print(f"== 10 clients, tiny model, {args.rounds} rounds (2 cores: 2 clients train at a time)")
            print(
                f"bare Flower round (no training), median: {statistics.median(bare):.2f} s  all: "
                + ", ".join(f"{t:.2f}" for t in bare)
            )
            print(f"bare Flower start-up, SuperLink start to round 1's start: {bare_startup:.1f} s")
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
                records50 = pfi_rounds(cfg50, "50 clients, 10 a round")
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
    print(f"(uptime at start: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    main()
    print_startup()
