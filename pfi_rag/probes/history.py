"""Read the federation's round history, as the federation launcher writes it.

Expected layout under the data root (written by ``pfi_rag.federation``; read-only here)::

    federation/rounds/round-0001.json
    federation/rounds/round-0001/global_adapter/     PEFT-format global adapter after round 1

and each round file is a JSON object::

    {"round": 1, "strategy": "fedavg",
     "participants": ["client-00", ...],
     "failures": [{"client": id, "error": str}],
     "sat_out": [{"client": id, "reason": str}],
     "updates": {id: {"norm": float, "cosine_to_mean": float, "num_examples": int, "epsilon": float}},
     "aggregate_norm": float,
     "metrics": {id: {"num_examples": float, "loss_before": float, "loss_after": float,
                      "noised": bool, "loss_std": float (noised only)}}}

Missing optional keys read as empty; a round file that is not JSON, or lacks ``round``, is an
error naming the file, because a probe that silently skipped a round would hide exactly the
failures it is meant to find.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUND_FILE = re.compile(r"round-(\d{4,})\.json")


class HistoryError(ValueError):
    """A round file is unreadable or malformed; the message names the file."""


@dataclass(frozen=True)
class Update:
    norm: float
    cosine_to_mean: float | None
    num_examples: int | None
    epsilon: float | None


@dataclass(frozen=True)
class Round:
    number: int
    strategy: str
    participants: list[str]
    failures: list[dict[str, Any]]
    sat_out: list[dict[str, Any]]
    updates: dict[str, Update]
    aggregate_norm: float | None
    metrics: dict[str, dict[str, float]]
    adapter_dir: Path | None  # the global adapter after this round, when saved
    path: Path = field(compare=False)


def rounds_dir(data_root: Path) -> Path:
    return Path(data_root) / "federation" / "rounds"


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def read_round(path: Path) -> Round:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        number = int(raw["round"])
        updates = {
            str(cid): Update(
                norm=float(u["norm"]),
                cosine_to_mean=_float_or_none(u.get("cosine_to_mean")),
                num_examples=None if u.get("num_examples") is None else int(u["num_examples"]),
                epsilon=_float_or_none(u.get("epsilon")),
            )
            for cid, u in (raw.get("updates") or {}).items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HistoryError(f"{path}: not a valid round record ({type(exc).__name__}: {exc})") from None
    adapter = Path(path).with_suffix("") / "global_adapter"
    return Round(
        number=number,
        strategy=str(raw.get("strategy", "")),
        participants=[str(c) for c in raw.get("participants") or []],
        failures=list(raw.get("failures") or []),
        sat_out=list(raw.get("sat_out") or []),
        updates=updates,
        aggregate_norm=_float_or_none(raw.get("aggregate_norm")),
        metrics={str(c): dict(m) for c, m in (raw.get("metrics") or {}).items()},
        adapter_dir=adapter if (adapter / "adapter_config.json").is_file() else None,
        path=Path(path),
    )


def read_history(data_root: Path) -> list[Round]:
    """Every recorded round, in round order (empty when the federation never ran)."""
    directory = rounds_dir(data_root)
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if ROUND_FILE.fullmatch(p.name)]
    return sorted((read_round(p) for p in files), key=lambda r: r.number)
