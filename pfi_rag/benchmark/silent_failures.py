"""`pfi-rag bench silent-failures`: plant each failure, federate, probe, score, write the table.

The matrix is every scenario (:data:`~pfi_rag.benchmark.scenarios.SCENARIOS`) times the
preset's seeds, each a real Flower run on its own data root, then the privacy/utility runs.
Per-run results are appended to ``runs.jsonl`` in the work directory as they finish, so a
long run that stops keeps what it measured. Every clean run, and every round of it, leaves a
probe report under ``references/`` in the work directory (:data:`REFERENCES_DIR`): the healthy
references `pfi-rag calibrate-probes` reads.
"""

from __future__ import annotations

import json
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
from pfi_rag.benchmark.runs import PRESETS, PROBES, Preset, run_one
from pfi_rag.benchmark.scenarios import SCENARIOS, Scenario
from pfi_rag.benchmark.scoring import calibration_summary, score
from pfi_rag.benchmark.tradeoff import run_tradeoff
from pfi_rag.config import Config

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
    on_event: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Every scenario x seed, then the trade-off runs; ``cfg`` already carries the preset's
    settings (``Preset.overrides()``). Writes the outputs under ``out`` and returns everything.
    ``probe_rounds``: also probe each clean run after every earlier round (one more suite per
    round, for that many more healthy references)."""
    from pfi_rag.models.loading import load_embedder

    started = time.perf_counter()
    embedder = load_embedder(cfg.models)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.jsonl"
    runs = []
    for seed in range(preset.seeds if matrix else 0):
        for scenario in scenarios:
            on_event(f"run {scenario.name} seed {seed} ...")
            result = run_one(
                cfg,
                work,
                scenario,
                seed=seed,
                embedder=embedder,
                probes=probes,
                references=work / REFERENCES_DIR,
                probe_rounds=probe_rounds,
            )
            runs.append(result)
            with log.open("a") as handle:
                handle.write(json.dumps(result, default=str) + "\n")
            failed = [p for p, v in result["probes"].items() if v["verdict"] == "fail"]
            on_event(
                f"  {result['seconds']:.0f} s; federation mean loss {result['system']['mean_loss_end']}; "
                f"probes failed: {', '.join(failed) or 'none'}"
            )
    tradeoff_rows = []
    if tradeoff:
        tradeoff_rows = run_tradeoff(
            cfg,
            work,
            preset.tradeoff_epsilons,
            embedder=embedder,
            on_run=lambda row: on_event(f"trade-off epsilon {row['epsilon']}: {row['mean']}"),
        )
    result = {
        "meta": {
            "preset": preset.name,
            "world": world,
            "command": " ".join(["pfi-rag", *map(shlex.quote, sys.argv[1:])]),
            "generator": cfg.models.generator,
            "clients": cfg.federation.clients,
            "rounds": cfg.federation.rounds,
            "seeds": preset.seeds if matrix else 0,
            "device": cfg.models.device,
            "intervals": "Wilson score, 95%",
            # The healthy reports left for `pfi-rag calibrate-probes` (one per clean run and round).
            "references": sorted(str(p) for p in (work / REFERENCES_DIR).glob("*/report.json")),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "versions": versions(),
            "seconds": time.perf_counter() - started,
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


__all__ = ["PRESETS", "REFERENCES_DIR", "run_benchmark"]
