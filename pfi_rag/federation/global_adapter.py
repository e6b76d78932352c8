"""The server's adapter files, written from numpy arrays: the ServerApp needs neither torch nor a model.

Each round the server writes the global adapter in PEFT format (``federation/global_adapter/`` and
``federation/rounds/<n>/adapter/``). Its weights are the fresh adapter's (seeded, the same in every
process) with the shared part replaced by the round's aggregate. The fresh adapter is saved once
as a template (:func:`write_template`, by whoever already holds the model: the launcher, or the
ServerApp itself in a deployment); :class:`AdapterFiles` then reads its weights as numpy arrays
and writes each round's adapter as the template's files with new weights. So the ServerApp's
process (Flower's ``flwr-simulation``) imports neither torch nor transformers and loads no model:
a few seconds less on every launch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pfi_rag.config import Config
from pfi_rag.models.adapters import (
    METADATA_FILE,
    AdapterInfo,
    next_adapter_info,
    write_adapter_info,
)
from pfi_rag.storage import atomic_directory

TEMPLATE = "initial-adapter"  # under the run directory: the fresh adapter, PEFT format
WEIGHTS = "adapter_model.safetensors"  # PEFT's file name for an adapter's weights


def write_template(cfg: Config, directory: Path) -> Path:
    """Save the fresh seeded adapter (:func:`~pfi_rag.federation.task.fresh_adapter`) to
    ``directory`` in PEFT format. Loads the model (once per process); returns ``directory``."""
    from pfi_rag.federation.task import fresh_adapter
    from pfi_rag.models.adapters import save_adapter

    model, _, _ = fresh_adapter(cfg)
    save_adapter(model, directory, source="initial")
    return Path(directory)


class AdapterFiles:
    """The template's weights (:attr:`initial`), and adapters written from them with new weights."""

    def __init__(self, template: Path):
        from safetensors.numpy import load_file

        self.template = Path(template)
        self.initial: dict[str, np.ndarray] = load_file(str(self.template / WEIGHTS))

    def save(self, arrays: dict[str, np.ndarray], directory: Path, *, round: int, source: str) -> AdapterInfo:
        """The template with ``arrays`` (some or all of its weights) replaced, saved to
        ``directory`` as its next version, atomically, as ``models.adapters.save_adapter`` does."""
        from safetensors.numpy import save_file

        unknown = set(arrays) - set(self.initial)
        if unknown:
            raise KeyError(f"not weights of the adapter: {sorted(unknown)[:3]}")
        weights = {
            name: np.ascontiguousarray(arrays.get(name, value), dtype=value.dtype)
            for name, value in self.initial.items()
        }
        info = next_adapter_info(directory, round=round, source=source)
        with atomic_directory(directory) as staging:
            for item in self.template.iterdir():
                if item.is_file() and item.name not in (WEIGHTS, METADATA_FILE):
                    shutil.copy2(item, staging / item.name)
            save_file(weights, str(staging / WEIGHTS), metadata={"format": "pt"})  # as PEFT writes it
            write_adapter_info(staging, info)
        return info


__all__ = ["TEMPLATE", "AdapterFiles", "write_template"]
