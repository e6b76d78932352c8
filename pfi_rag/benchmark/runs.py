"""One benchmark run: synthesise, plant, index, federate on Flower, probe; and the presets.

Each run gets its own data root, so runs never share a ledger, an index or an adapter. What a
run returns is small and JSON-ready: the ground truth, the metrics a plain federation reports,
and every probe's verdict and value.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pfi_rag.benchmark.scenarios import Scenario
from pfi_rag.config import Config
from pfi_rag.presets import Preset

# The probes the benchmark scores: every one with a planted failure to find, and the general
# ones whose false alarms matter. Fairness needs clients trained alone and groundedness
# generates answers: both would only add minutes (docs/benchmark.md).
PROBES = (
    "bias",
    "calibration",
    "capability",
    "refusal",
    "ood",
    "erosion",
    "exposure",
    "membership",
    "leakage",
    "budget",
    "dp_collapse",
    "retrieval_hit",
    "stale",
    "update_outliers",
    "silent_failures",
)

# Probes that read only the round records, ledgers and indexes (no forward pass of the model):
# under a second a run. With planted_probes = "intended", a planted run runs these and the
# probes meant to catch its failure; the clean runs always run every probe.
RECORD_PROBES = ("budget", "retrieval_hit", "stale", "update_outliers", "silent_failures")
PLANTED_PROBES = ("all", "intended")


def probes_for(scenario: Scenario, probes: tuple[str, ...], planted_probes: str = "all") -> tuple[str, ...]:
    """The probes a run of ``scenario`` runs: all of ``probes`` for a clean run (false alarms
    and calibration need every one) and with ``planted_probes = "all"``; else its detectors and
    the :data:`RECORD_PROBES`."""
    if planted_probes == "all" or scenario.name == "clean":
        return probes
    return tuple(p for p in probes if p in scenario.detectors or p in RECORD_PROBES)


# round_metrics "exact": the federation's view the benchmark compares against is a plain
# federation's, exact losses from every client, not the private release (docs/privacy.md).
PRESETS = {
    "quick": Preset(
        name="quick",
        generator="tiny-random",
        seeds=2,
        clients=4,
        rounds=2,
        local_steps=3,
        batch_size=4,
        max_seq_len=48,
        exposure_samples=64,
        round_metrics="exact",
        tradeoff_epsilons=(1.0, 4.0, 8.0, None),
    ),
    "full": Preset(
        name="full",
        generator="smollm2",
        seeds=5,  # thresholds are calibrated leave-one-seed-out: 4 clean runs' rounds per seed
        clients=4,
        rounds=3,
        local_steps=5,
        batch_size=8,
        max_seq_len=64,
        exposure_samples=256,
        round_metrics="exact",
        tradeoff_epsilons=(1.0, 4.0, 8.0, None),
    ),
}


def prepare_run(base: Config, root: Path, scenario: Scenario, *, seed: int, embedder):
    """A fresh data root with the scenario planted and every client's index built; returns
    (config of the run, what was planted)."""
    from pfi_rag.data.records import load_client_data
    from pfi_rag.data.synth import synthesize
    from pfi_rag.layout import list_clients
    from pfi_rag.retriever import ClientStore

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cfg = base.model_copy(deep=True)
    cfg.data_root = root
    cfg.seed = seed
    if scenario.world == "realtext":
        return _prepare_realtext(cfg, scenario, embedder)
    synthesize(root, clients=cfg.federation.clients, seed=seed)
    planted = scenario.plant(root, cfg)
    for client in list_clients(root):
        data = load_client_data(root, client)
        with ClientStore.open(root, client, cfg.retrieval, embedder) as store:
            store.add_documents(data.documents, source="documents.jsonl")
            if client not in planted.skip_updates:
                store.add_documents(data.updates, source="updates.jsonl")
    return cfg, planted


def _prepare_realtext(cfg: Config, scenario: Scenario, embedder):
    """The real-text world: chatterbot-corpus topics as clients, planted, then ingested through
    the store (``.txt`` files, as ``pfi-rag ingest`` reads them); no manifest, no synthetic data."""
    from pfi_rag.benchmark import realtext
    from pfi_rag.retriever import ClientStore

    planted = scenario.plant(cfg.data_root, cfg)
    realtext.build_clients(cfg, cfg.data_root.parent / f"{cfg.data_root.name}-txt", embedder)
    for client, documents in planted.extra_documents.items():
        with ClientStore.open(cfg.data_root, client, cfg.retrieval, embedder) as store:
            store.add_documents(documents, source="planted")
    return cfg, planted


def federate(cfg: Config, client_mods: list, on_round=None) -> dict[str, Any]:
    """The real Flower simulation; returns what a plain federation's dashboard would show.
    ``on_round(record)`` runs here after each round while the ServerApp waits for it: it sees
    that round's adapters, ledgers and history, before the next round starts."""
    from pfi_rag.federation.launcher import run_simulation, summarize

    started, wall_started = time.perf_counter(), time.time()
    records = run_simulation(cfg, client_mods=client_mods, on_round=on_round)
    wall_ended = time.time()
    summary = summarize(cfg, records)
    first, last = (records[0], records[-1]) if records else (None, None)
    return {
        # The federation's own numbers: mean training loss across clients (first round before
        # training, last round after), failed results, and the global update's norm.
        "mean_loss_start": _mean_client_metric(first, "loss_before"),
        "mean_loss_end": _mean_client_metric(last, "loss_after"),
        "failures": sum(len(r.failures) for r in records),
        "aggregate_norm": last.aggregate_norm if last is not None else None,
        "epsilon": {client: row.epsilon for client, row in summary.clients.items()},
        "seconds": time.perf_counter() - started,
        "timings": federation_timings(cfg, records, wall_started, wall_ended),
    }


def federation_timings(cfg: Config, records, started: float, ended: float) -> dict[str, Any]:
    """Where a federation's wall time went, from the round records' own durations and their files'
    times (``time.time()`` stamps, comparable across Flower's processes): start-up (launch until
    round 1 began: Flower, Ray, the ServerApp's model, the workers' models), each round, the
    pause after each round (the launcher's per-round work while the ServerApp waits, and writing
    the round's adapters), and the wind-down after the last round. The clients' own phase sums
    (model load, evaluation, DP steps) come from their local timings logs."""
    from pfi_rag.layout import client_timings_file, list_clients, round_record_file

    ends = [round_record_file(cfg.data_root, r.round).stat().st_mtime for r in records]
    starts = [end - (r.seconds or 0.0) for end, r in zip(ends, records, strict=True)]
    phases: dict[str, float] = {}
    for client in list_clients(cfg.data_root) if records else []:
        path = client_timings_file(cfg.data_root, client)
        for line in path.read_text().splitlines() if path.is_file() else []:
            for phase, seconds in json.loads(line)["phases"].items():
                phases[phase] = phases.get(phase, 0.0) + seconds
    return {
        "startup_s": starts[0] - started if records else None,
        "rounds_s": [r.seconds for r in records],
        "after_round_s": [nxt - end for end, nxt in zip(ends, starts[1:], strict=False)],
        "wind_down_s": ended - ends[-1] if records else None,
        "client_phases_s": {phase: round(seconds, 2) for phase, seconds in phases.items()},
    }


def _mean_client_metric(record, key: str) -> float | None:
    """The mean over clients of a round record's ``loss_before`` or ``loss_after`` (None: no round)."""
    values = [getattr(m, key) for m in record.metrics.values()] if record is not None else []
    values = [x for x in values if x is not None and math.isfinite(x)]
    return statistics.fmean(values) if values else None


def probe_report(cfg: Config, probes: tuple[str, ...] = PROBES, *, embedder=None):
    """The probe suite's :class:`~pfi_rag.probes.runner.Report` on the data root's current state
    (exact, not the private release)."""
    from pfi_rag.probes import ProbeContext, run_suite

    context = ProbeContext(cfg, embedder=embedder)
    try:
        return run_suite(context, suite="all", only=list(probes), private=False)
    finally:
        context.close()


def timed_report(cfg: Config, probes: tuple[str, ...], *, embedder, reports: list[dict], name: str):
    """:func:`probe_report`, its wall time appended to ``reports`` (``name``, seconds, and the
    probes' own seconds summed: the rest is the context's set-up, models and indexes)."""
    started = time.perf_counter()
    report = probe_report(cfg, probes, embedder=embedder)
    seconds = time.perf_counter() - started
    reports.append({"report": name, "seconds": seconds, "probes_s": sum(s.seconds for s in report.summaries)})
    return report


def verdicts(report) -> dict[str, dict[str, Any]]:
    """Every probe's verdict, value and flagged clients, keyed by probe."""
    return {
        s.probe: {
            "verdict": str(s.verdict),
            "value": s.value,
            "metric": s.metric,
            "fails_above": s.fails_above,
            "threshold": s.threshold,
            "flagged_clients": list(s.flagged_clients),
            "seconds": s.seconds,
        }
        for s in report.summaries
    }


def save_reference(report, references: Path, name: str) -> Path:
    """``references/<name>/report.json``, as `pfi-rag probe --out` writes it (without the HTML),
    so `pfi-rag calibrate-probes references/*/report.json` reads every healthy report."""
    from pfi_rag.storage import atomic_write_text

    path = references / name / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.as_dict(), indent=2, allow_nan=False) + "\n")
    return path


def run_one(
    base: Config,
    work: Path,
    scenario: Scenario,
    *,
    seed: int,
    embedder,
    probes: tuple[str, ...] = PROBES,
    references: Path | None = None,
    probe_rounds: bool = True,
) -> dict:
    """One planted run. A clean run is a healthy reference: with ``references`` set, its probe
    report is saved there, and with ``probe_rounds`` also one after each earlier round (the
    probes run on the server between rounds, on the state that round left: adapters, ledgers,
    history so far), so N seeds of R rounds leave N x R reports for `pfi-rag calibrate-probes`."""
    started = time.perf_counter()
    root = work / f"{scenario.name}-seed{seed}"
    cfg, planted = prepare_run(base, root, scenario, seed=seed, embedder=embedder)
    prepared_s = time.perf_counter() - started
    healthy = scenario.name == "clean" and references is not None
    round_probes: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []  # each probe report's wall time

    def probe_round(record) -> None:
        if record.round >= cfg.federation.rounds:
            return  # the last round's state is what the run is probed on below
        report = timed_report(cfg, probes, embedder=embedder, reports=reports, name=f"round {record.round}")
        save_reference(report, references, f"clean-seed{seed}-round{record.round:04d}")
        round_probes.append({"round": record.round, "probes": verdicts(report)})

    system = federate(cfg, planted.client_mods, on_round=probe_round if healthy and probe_rounds else None)
    report = timed_report(cfg, probes, embedder=embedder, reports=reports, name="final")
    if healthy:
        save_reference(report, references, f"clean-seed{seed}-round{cfg.federation.rounds:04d}")
    result = {
        "scenario": scenario.name,
        "seed": seed,
        "planted_clients": planted.clients,
        "planted": planted.detail,
        "system": system,
        "probes": verdicts(report),
        "seconds": time.perf_counter() - started,
        # Where the run's time went: data and indexes, the federation (its own breakdown under
        # system.timings), and each probe report (per probe: probes.<name>.seconds).
        "timings": {"prepare_s": prepared_s, "federation_s": system["seconds"], "reports": reports},
    }
    if round_probes:
        result["round_probes"] = round_probes  # earlier rounds' healthy reports (scoring.py)
    return result
