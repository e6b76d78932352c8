"""`pfi-rag bench silent-failures`: plant each failure, federate, probe, score, write the table.

The matrix is every scenario (:data:`~pfi_rag.benchmark.scenarios.SCENARIOS`) times the
preset's seeds, each a real Flower run on its own data root, then the privacy/utility runs.
Per-run results are appended to ``runs.jsonl`` in the work directory as they finish
(:mod:`.worklog`): a later invocation with the same settings reuses them and runs only what is
missing, so a matrix of hours accumulates over several invocations. Every clean run, and every
round of it, leaves a probe report under ``references/`` in the work directory
(:data:`REFERENCES_DIR`): the healthy references `pfi-rag calibrate-probes` reads.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from pfi_rag.benchmark.report import write_outputs
from pfi_rag.benchmark.runs import PRESETS, PROBES, Preset, probes_for, run_one
from pfi_rag.benchmark.scenarios import SCENARIOS, Scenario
from pfi_rag.benchmark.scoring import calibration_summary, score
from pfi_rag.benchmark.tradeoff import run_tradeoff
from pfi_rag.benchmark.worklog import WorkLog, fingerprint
from pfi_rag.config import Config
from pfi_rag.federation.server import FederationFailed

REFERENCES_DIR = "references"  # <work>/references/clean-seed<k>-round<r>/report.json

VERSIONS = (
    "pfi-rag",
    "torch",
    "transformers",
    "peft",
    "opacus",
    "flwr",
    "faiss-cpu",
    "sentence-transformers",
)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def run_benchmark(
    cfg: Config,
    *,
    preset: Preset,
    out: Path,
    work: Path,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
    matrix: bool = True,
    tradeoff: bool = True,
    probes: tuple[str, ...] = PROBES,
    world: str = "synthetic",
    probe_rounds: bool = True,
    planted_probes: str = "all",
    fresh: bool = False,
    report_only: bool = False,
    on_event: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Every scenario x seed, then the trade-off runs; ``cfg`` already carries the preset's
    settings (``Preset.overrides()``). Writes the outputs under ``out`` and returns everything.
    ``probe_rounds``: also probe each clean run after every earlier round (one more suite per
    round, for that many more healthy references). ``planted_probes = "intended"``: a planted run
    runs only its intended probes and the cheap record probes (:func:`~.runs.probes_for`; the
    clean runs run every probe). Runs already finished in ``work`` with the same settings are
    reused (:class:`~pfi_rag.benchmark.worklog.WorkLog`); ``fresh`` discards them first.
    ``report_only``: run nothing, write the outputs from the runs finished so far (the work log
    is only read, so this is safe beside a running invocation; ``meta["missing"]`` lists what is
    not done yet). Raises
    :class:`~pfi_rag.benchmark.worklog.SettingsChanged` when ``work`` holds runs made with other
    settings (or, for a report, none)."""
    from pfi_rag.models.loading import load_embedder

    started = time.perf_counter()
    command = " ".join(["pfi-rag", *map(shlex.quote, sys.argv[1:])])
    key = fingerprint(
        cfg,
        preset=preset.name,
        world=world,
        probes=probes,
        probe_rounds=probe_rounds,
        planted_probes=planted_probes,
    )
    described = {"preset": preset.name, "world": world}
    if report_only:
        log = WorkLog.read(work, key)
    else:
        log = WorkLog.open(work, key, describe=described, command=command, fresh=fresh)
    wanted = [(scenario, seed) for seed in range(preset.seeds if matrix else 0) for scenario in scenarios]
    finished = log.finished_runs()
    done_tradeoff = log.finished_tradeoff()
    reused = [finished[(s.name, seed)] for s, seed in wanted if (s.name, seed) in finished]
    epsilons = preset.tradeoff_epsilons if tradeoff else ()
    reused_rows = [e for e in epsilons if e in done_tradeoff]
    # What a report does not cover yet: runs not reached (--report-only), or whose federation
    # failed (``failed_runs`` says why; the next invocation runs them again).
    missing: dict[str, Any] = {"runs": {}, "tradeoff": []}
    failed_runs: list[dict[str, Any]] = []
    if report_only:
        missing["tradeoff"] = [_epsilon_label(e) for e in epsilons if e not in done_tradeoff]
        for scenario, seed in wanted:
            if (scenario.name, seed) not in finished:
                missing["runs"].setdefault(scenario.name, []).append(seed)
        on_event(
            f"reporting on {len(reused)} of {len(wanted)} runs and {len(reused_rows)} of "
            f"{len(epsilons)} trade-off runs finished in {work}; nothing runs"
        )
    elif reused or reused_rows:
        on_event(
            f"reusing {len(reused)} of {len(wanted)} runs and {len(reused_rows)} of {len(epsilons)} "
            f"trade-off runs finished earlier in {work} (same settings, fingerprint {key}); "
            "--fresh runs them again"
        )
    to_run = len(wanted) - len(reused) + len(epsilons) - len(reused_rows)
    embedder = load_embedder(cfg.models) if to_run and not report_only else None
    runs = []
    for scenario, seed in wanted:
        if (scenario.name, seed) in finished:
            runs.append(finished[(scenario.name, seed)])
            continue
        if report_only:
            continue
        on_event(f"run {scenario.name} seed {seed} ...")
        try:
            result = run_one(
                cfg,
                work,
                scenario,
                seed=seed,
                embedder=embedder,
                probes=probes_for(scenario, probes, planted_probes),
                references=work / REFERENCES_DIR,
                probe_rounds=probe_rounds,
            )
        except FederationFailed as exc:
            # Flower can lose a run to its own machinery (a missed task heartbeat on a loaded
            # host); one lost run must not cost the hours of matrix after it. Nothing is logged
            # for it, so the next invocation runs it again.
            missing["runs"].setdefault(scenario.name, []).append(seed)
            failed_runs.append({"scenario": scenario.name, "seed": seed, "error": str(exc)})
            on_event(f"  failed, left for the next invocation: {exc}")
            continue
        runs.append(result)
        log.record(result)
        failed = [p for p, v in result["probes"].items() if v["verdict"] == "fail"]
        on_event(
            f"  {result['seconds']:.0f} s; federation mean loss {result['system']['mean_loss_end']}; "
            f"probes failed: {', '.join(failed) or 'none'}"
        )
    tradeoff_rows = [done_tradeoff[e] for e in epsilons if e in done_tradeoff]
    if tradeoff and not report_only:

        def on_row(row: dict[str, Any]) -> None:
            log.record(row, kind="tradeoff")
            on_event(f"trade-off epsilon {row['epsilon']}: {row['mean']}")

        tradeoff_rows = run_tradeoff(
            cfg, work, epsilons, embedder=embedder, finished=done_tradeoff, on_run=on_row
        )
    seconds = time.perf_counter() - started
    if not report_only:
        log.finish(ran=to_run, reused=len(reused) + len(reused_rows), seconds=seconds)
    result = {
        "meta": {
            "preset": preset.name,
            "world": world,
            "command": command,
            "generator": cfg.models.generator,
            "clients": cfg.federation.clients,
            "rounds": cfg.federation.rounds,
            "seeds": preset.seeds if matrix else 0,
            "device": cfg.models.device,
            "intervals": "Wilson score, 95%",
            "planted_probes": planted_probes,  # "intended": planted runs ran only their detectors
            # The healthy reports left for `pfi-rag calibrate-probes` (one per clean run and round).
            "references": reference_files(runs, work / REFERENCES_DIR, cfg.federation.rounds),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "versions": versions(),
            "seconds": seconds,  # this invocation's wall time
            # A report on a matrix still accumulating: what it does not cover yet (seeds by
            # scenario, trade-off runs by epsilon).
            "report_only": report_only,
            "missing": missing,
            "failed_runs": failed_runs,
            # The matrix may have accumulated over several invocations (same settings): how many,
            # and the sum of its runs' own seconds, this invocation's and the reused ones.
            "invocations": len(log.invocations),
            "fingerprint": key,
            "reused": len(reused) + len(reused_rows),
            "run_seconds": run_seconds(runs, tradeoff_rows),
            # Which versions of pfi-rag's code made these runs (worklog.code_version); runs logged
            # before runs were stamped say "unrecorded".
            "code_versions": sorted({r.get("code", "unrecorded") for r in [*runs, *tradeoff_rows]}),
        },
        "scenarios": {s.name: {"failure": s.failure, "detectors": list(s.detectors)} for s in scenarios},
        "scores": score(runs, scenarios),
        # Per seed: the leave-one-seed-out thresholds its runs were judged against.
        "calibration": calibration_summary(runs),
        "runs": runs,
        "tradeoff": tradeoff_rows,
    }
    result["outputs"] = {k: str(v) for k, v in write_outputs(out, result).items()}
    return result


def _epsilon_label(epsilon: float | None) -> str:
    return "non-private" if epsilon is None else f"{epsilon:g}"


def run_seconds(runs: list[dict[str, Any]], tradeoff_rows: list[dict[str, Any]]) -> float:
    """The runs' own seconds summed (matrix and trade-off), whichever invocation made them."""
    tradeoff = [row["system"].get("seconds", 0.0) + row.get("measure_seconds", 0.0) for row in tradeoff_rows]
    return sum(r["seconds"] for r in runs) + sum(tradeoff)


def reference_files(runs: list[dict[str, Any]], references: Path, rounds: int) -> list[str]:
    """The healthy reports of this result's clean runs, every round each was probed after."""
    found = []
    for run in runs:
        if run["scenario"] != "clean":
            continue
        probed = [r["round"] for r in run.get("round_probes", [])] + [rounds]
        found += [str(references / f"clean-seed{run['seed']}-round{r:04d}" / "report.json") for r in probed]
    return sorted(found)


__all__ = ["PRESETS", "REFERENCES_DIR", "reference_files", "run_benchmark", "run_seconds"]
