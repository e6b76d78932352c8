"""The federation's resumable checkpoint on the server's disk (the round records: :mod:`.records`).

``federation/checkpoint/`` (:func:`pfi_rag.layout.checkpoint_dir`) holds arrays.npz (the global
shared arrays) and state.json, replaced together atomically.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfi_rag import layout
from pfi_rag.storage import atomic_directory, recover_directory


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any]


def save_checkpoint(data_root: Path, round_number: int, arrays: dict[str, np.ndarray], state: dict) -> None:
    """Write the global arrays and server state after ``round_number`` as one atomic unit."""
    with atomic_directory(layout.checkpoint_dir(data_root)) as staging:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        (staging / "arrays.npz").write_bytes(buffer.getvalue())
        (staging / "state.json").write_text(json.dumps({**state, "round": round_number}, indent=2))


def load_checkpoint(data_root: Path) -> Checkpoint | None:
    directory = layout.checkpoint_dir(data_root)
    recover_directory(directory)
    if not (directory / "state.json").is_file():
        return None
    state = json.loads((directory / "state.json").read_text())
    with np.load(directory / "arrays.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    return Checkpoint(round=int(state["round"]), arrays=arrays, state=state)
