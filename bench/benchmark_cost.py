"""Where a silent-failure benchmark run's time goes, and what the whole matrix would cost.

Reads the ``runs.jsonl`` of a benchmark work directory (``<data_root>/bench-silent-failures/``)
and prints, per run: preparing the data and indexes, the federation (start-up until round 1,
each round, the pauses after rounds while the launcher probed, the wind-down, and the clients'
own phases summed: model, evaluation, DP steps), and each probe report with its probes' seconds.

Then a projection for a matrix of ``--seeds`` x every scenario of the synthetic world: the
clean run as measured; each planted scenario from the measured planted run, with its federation
scaled by the extra training the scenario plants (records to evaluate and DP steps of its
clients, from the measured per-record and per-step costs and the data a planting writes) and
its probe report from the measured per-probe seconds (all probes, or with ``--planted-probes
intended`` its own detectors and the record-only probes). Trade-off runs are added from
``--tradeoff-seconds`` (measured elsewhere). Estimates, not measurements: they say which part
dominates.

    .venv/bin/python bench/benchmark_cost.py WORK/runs.jsonl [--seeds 5] [--planted-probes intended]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import tomllib
from pathlib import Path

from pfi_rag.benchmark.runs import PRESETS, PROBES, probes_for
from pfi_rag.benchmark.scenarios import SCENARIOS
from pfi_rag.config import load_config
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.layout import client_settings_file, list_clients

WORKERS = 2  # simulation workers (one per core here)


def show_run(run: dict) -> None:
    timings, system = run.get("timings", {}), run["system"]
    fed = system.get("timings", {})
    print(f"{run['scenario']} seed {run['seed']}: {run['seconds']:.0f} s")
    print(f"  prepare (data, indexes) {timings.get('prepare_s', 0):.1f} s")
    rounds = ", ".join(f"{s:.1f}" for s in fed.get("rounds_s", []))
    pauses = ", ".join(f"{s:.1f}" for s in fed.get("after_round_s", []))
    print(
        f"  federation {system['seconds']:.1f} s: start-up {fed.get('startup_s', 0):.1f}, "
        f"rounds [{rounds}], after rounds [{pauses}], wind-down {fed.get('wind_down_s', 0):.1f}"
    )
    phases = fed.get("client_phases_s", {})
    print("  clients' phases summed: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    for report in timings.get("reports", []):
        print(
            f"  probe report {report['report']}: {report['seconds']:.1f} s "
            f"(probes {report['probes_s']:.1f}, set-up {report['seconds'] - report['probes_s']:.1f})"
        )
    per_probe = sorted(run["probes"].items(), key=lambda kv: -(kv[1].get("seconds") or 0))
    print("  final report per probe: " + ", ".join(f"{n} {v.get('seconds') or 0:.1f}" for n, v in per_probe))


def client_costs(run: dict, work: Path) -> tuple[dict[str, int], float, float, float]:
    """(records each client evaluated, seconds per evaluated record, seconds per DP step, other
    seconds per client round), from the clients' timings logs of a normally trained run."""
    root = work / f"{run['scenario']}-seed{run['seed']}"
    evaluated: dict[str, int] = {}
    evaluate = evaluations = steps_s = steps = other = entries = 0.0
    for client in list_clients(root):
        path = root / "clients" / client / "logs" / "federation-timings.jsonl"
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            phases = entry["phases"]
            evaluated[client] = entry["evaluated"]
            evaluate += phases.get("evaluate", 0.0)
            evaluations += 2 * entry["evaluated"]  # before and after training
            steps_s += phases.get("dp_steps", 0.0)
            steps += PRESETS["full"].local_steps
            other += entry["total"] - phases.get("evaluate", 0.0) - phases.get("dp_steps", 0.0)
            entries += 1
    return evaluated, evaluate / evaluations, steps_s / steps, other / entries


def planted_load(scenario, preset, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Per client (documents + instructions, DP steps per round) after planting ``scenario``."""
    cfg = load_config(None, preset.overrides())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg.data_root = root
        synthesize(root, clients=preset.clients, seed=seed)
        scenario.plant(root, cfg)
        load = {}
        for client in list_clients(root):
            data = load_client_data(root, client)
            settings = client_settings_file(root, client)
            own = tomllib.loads(settings.read_text()).get("privacy", {}) if settings.is_file() else {}
            load[client] = (
                len(data.documents) + len(data.instructions),
                own.get("local_steps", preset.local_steps),
            )
        return load


def round_wall(client_seconds: list[float]) -> float:
    """Longest-first on WORKERS workers: the busiest worker's total."""
    workers = [0.0] * WORKERS
    for seconds in sorted(client_seconds, reverse=True):
        workers[workers.index(min(workers))] += seconds
    return max(workers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, help="a benchmark work directory's runs.jsonl")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--planted-probes", default="all", choices=("all", "intended"))
    parser.add_argument("--tradeoff-seconds", type=float, default=0.0, help="the trade-off runs, measured")
    parser.add_argument(
        "--eval-cap",
        type=int,
        default=None,
        help="what-if: each client evaluates at most this many records before and after training",
    )
    args = parser.parse_args()
    runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if r.get("kind", "run") == "run"]
    for run in runs:
        show_run(run)
    clean = next(r for r in runs if r["scenario"] == "clean")
    planted = next(r for r in runs if r["scenario"] != "clean")
    preset = PRESETS["full"]
    evaluated, per_record, per_step, other = client_costs(planted, args.runs.parent)
    measured_load = planted_load(next(s for s in SCENARIOS if s.name == planted["scenario"]), preset)
    print(
        f"\nper client round: {per_record:.3f} s per evaluated record, {per_step:.2f} s per DP step, "
        f"{other:.1f} s else"
    )

    def federation_rounds(load: dict[str, tuple[int, int]], cap: int | None = None) -> float:
        """Each client evaluates as many records as measured, scaled by what the planting added
        (at most ``cap``)."""
        per_client = []
        for client, (records, steps) in load.items():
            evaluations = evaluated[client] * records / measured_load[client][0]
            evaluations = evaluations if cap is None else min(evaluations, cap)
            per_client.append(2 * evaluations * per_record + steps * per_step + other)
        return preset.rounds * round_wall(per_client)

    base_rounds = federation_rounds(measured_load)
    fixed = planted["system"]["seconds"] - base_rounds  # start-up, pauses, wind-down
    probe_s = {name: entry.get("seconds") or 0.0 for name, entry in clean["probes"].items()}
    final = clean["timings"]["reports"][-1]
    setup = final["seconds"] - final["probes_s"]
    prepare = statistics.fmean(r["timings"]["prepare_s"] for r in runs)
    print(f"federation outside the rounds (model fit): {fixed:.1f} s; report set-up {setup:.1f} s\n")
    clean_load = planted_load(SCENARIOS[0], preset)
    saved = federation_rounds(clean_load) - federation_rounds(clean_load, args.eval_cap)  # the what-if's
    total = args.seeds * (clean["seconds"] - saved)
    print(f"{'scenario':<24} {'federation':>10} {'report':>8} {'run':>8}")
    print(
        f"{'clean (measured)':<24} {clean['system']['seconds'] - saved:>10.0f} {'':>8} "
        f"{clean['seconds'] - saved:>8.0f}"
    )
    for scenario in SCENARIOS:
        if scenario.name == "clean":
            continue
        federation = fixed + federation_rounds(planted_load(scenario, preset), args.eval_cap)
        chosen = probes_for(scenario, PROBES, args.planted_probes)
        report = setup + sum(probe_s.get(p, 0.0) for p in chosen)
        run_s = prepare + federation + report
        total += args.seeds * run_s
        print(f"{scenario.name:<24} {federation:>10.0f} {report:>8.0f} {run_s:>8.0f}")
    total += args.tradeoff_seconds
    print(
        f"\nprojected full matrix: {args.seeds} seeds x {len(SCENARIOS)} scenarios"
        f" (planted probes: {args.planted_probes}; records evaluated per client round: "
        f"{args.eval_cap or 'all'}) + trade-off {args.tradeoff_seconds:.0f} s"
        f" = {total / 60:.0f} min ({total / 3600:.1f} h)"
    )


if __name__ == "__main__":
    main()
