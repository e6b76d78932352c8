"""The federation's state on the server's disk: per-round records and a resumable checkpoint.

Layout under ``<data_root>/federation/``::

    checkpoint/            arrays.npz (global shared arrays) + state.json, replaced atomically
    global_adapter/        the latest global adapter, PEFT format (served to clients without one)
    rounds/round-0001.json what happened in round 1 (format below; read by the probes)
    rounds/round-0001/global_adapter/   that round's global adapter (alignment-erosion series)

A round record: ``{"round", "strategy", "participants", "failures": [{"client", "error"}],
"sat_out": [{"client", "reason"}], "updates": {client: {"norm", "cosine_to_mean",
"num_examples"}}, "aggregate_norm", "metrics": {client: {"num_examples",
"loss_before", "loss_after", "noised", "loss_std"}}, "server_dp": {"noise_multiplier", "clip_norm",
"epsilon", "delta"}, "seconds"}``. A failure's ``error`` and a sat-out's ``reason`` are codes from
``federation.task.FAILURE_CODES`` (what a client sends), never exception text.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfi_rag.storage import atomic_directory, atomic_write_json, recover_directory


def federation_dir(data_root: Path) -> Path:
    return Path(data_root) / "federation"


def round_record_path(data_root: Path, round_number: int) -> Path:
    return federation_dir(data_root) / "rounds" / f"round-{round_number:04d}.json"


def round_adapter_dir(data_root: Path, round_number: int) -> Path:
    return federation_dir(data_root) / "rounds" / f"round-{round_number:04d}" / "global_adapter"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]


def save_checkpoint(data_root: Path, round_number: int, arrays: dict[str, np.ndarray], state: dict) -> None:
    """Write the global arrays and server state after ``round_number`` as one atomic unit."""
    with atomic_directory(federation_dir(data_root) / "checkpoint") as staging:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        (staging / "arrays.npz").write_bytes(buffer.getvalue())
        (staging / "state.json").write_text(json.dumps({**state, "round": round_number}, indent=2))


def load_checkpoint(data_root: Path) -> Checkpoint | None:
    directory = federation_dir(data_root) / "checkpoint"
    recover_directory(directory)
    if not (directory / "state.json").is_file():
        return None
    state = json.loads((directory / "state.json").read_text())
    with np.load(directory / "arrays.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    return Checkpoint(round=int(state["round"]), arrays=arrays, state=state)


def write_round_record(data_root: Path, record: dict[str, Any]) -> Path:
    path = round_record_path(data_root, int(record["round"]))
    atomic_write_json(path, record)
    return path


def read_round_records(data_root: Path) -> list[dict[str, Any]]:
    rounds = federation_dir(data_root) / "rounds"
    if not rounds.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(rounds.glob("round-*.json"))]
