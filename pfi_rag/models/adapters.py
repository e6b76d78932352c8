"""Per-client LoRA adapters on disk: PEFT format plus a small version record.

``clients/<id>/adapter/`` is a directory ``PeftModel.from_pretrained`` loads as is, with
``pfi-rag-adapter.json`` beside the weights: the version (increasing by one per save), the
federation round it came from (None for local training), and when. The shared/global adapter
of a federation lives at ``federation/global_adapter/`` in the same format. A save replaces the
whole directory atomically, so a reader sees the old or the new adapter, never a mix.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Where adapters live is pfi_rag.layout's; tests and benches still import the two names from here.
from pfi_rag.layout import client_adapter_dir, global_adapter_dir  # noqa: F401
from pfi_rag.storage import atomic_directory, recover_directory

METADATA_FILE = "pfi-rag-adapter.json"


@dataclass(frozen=True)
class AdapterInfo:
    version: int
    round: int | None
    created_at: str
    source: str  # "local" (pfi-rag train), "federated" (a round), ...
    # The client's composed epsilon (its privacy ledger's) when this version was saved: what the
    # adapter has absorbed; None when not recorded. Training refuses an adapter whose epsilon is
    # above its ledger's (a deleted or replaced ledger).
    epsilon: float | None = None

    @classmethod
    def read(cls, directory: Path) -> AdapterInfo | None:
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def read_adapter_info(directory: Path) -> AdapterInfo | None:
    """The version record of the adapter in ``directory``, or None when there is none."""
    recover_directory(directory)
    if not (Path(directory) / "adapter_config.json").is_file():
        return None
    return AdapterInfo.read(directory) or AdapterInfo(version=0, round=None, created_at="", source="external")


def save_adapter(
    model,
    directory: Path,
    *,
    round: int | None = None,
    source: str = "local",
    adapter_name: str = "default",
    epsilon: float | None = None,
) -> AdapterInfo:
    """Save ``model``'s adapter ``adapter_name`` to ``directory`` as the next version, atomically."""
    info = next_adapter_info(directory, round=round, source=source, epsilon=epsilon)
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging, selected_adapters=[adapter_name])
        if adapter_name != "default":
            # PEFT saves non-default adapters in a subdirectory; keep one adapter per directory.
            nested = staging / adapter_name
            for item in nested.iterdir():
                item.rename(staging / item.name)
            nested.rmdir()
        write_adapter_info(staging, info)
    return info


def next_adapter_info(
    directory: Path, *, round: int | None, source: str, epsilon: float | None = None
) -> AdapterInfo:
    """The metadata of the next version of the adapter in ``directory`` (version 1 if it has none)."""
    previous = read_adapter_info(directory)
    return AdapterInfo(
        version=(previous.version if previous else 0) + 1,
        round=round,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source,
        epsilon=epsilon,
    )


def write_adapter_info(staging: Path, info: AdapterInfo) -> None:
    """Write ``info`` beside the adapter files being staged in ``staging``."""
    (staging / METADATA_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n")


def peek_adapter_info(directory: Path, *, attempts: int = 20, wait_s: float = 0.005) -> AdapterInfo | None:
    """Like :func:`read_adapter_info`, for readers that run beside a writer (serving).

    It never repairs an interrupted swap: a reader moving ``<dir>.old-*`` back could collide with
    the writer's second rename. A directory missing while such a sibling exists is a swap in
    progress, so it waits for the writer instead of reporting "no adapter".
    """
    directory = Path(directory)
    for _ in range(attempts):
        if (directory / "adapter_config.json").is_file():
            try:
                info = AdapterInfo.read(directory)
            except (FileNotFoundError, json.JSONDecodeError):  # replaced while reading: look again
                time.sleep(wait_s)
                continue
            return info or AdapterInfo(version=0, round=None, created_at="", source="external")
        if not any(directory.parent.glob(f"{directory.name}.old-*")):
            return None
        time.sleep(wait_s)
    return None
