"""A federation on the tiny model that finishes in seconds: its settings, as a config (the federation,
task and privacy-boundary tests) or as `pfi-rag` options (the real-text CLI tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfi_rag.config import Config, load_config

TINY_FEDERATION = {
    "models.generator": "tiny-random",
    "models.device": "cpu",
    "privacy.local_steps": 2,
    "privacy.batch_size": 4,
    "privacy.max_seq_len": 48,
    "privacy.epsilon_per_round": 4.0,
    "privacy.epsilon_max": 100.0,
}


def tiny_federation_settings(model_cache: Path, **overrides: Any) -> dict[str, Any]:
    """Dotted config keys, as `--set` takes them: :data:`TINY_FEDERATION` and the test model cache."""
    return {**TINY_FEDERATION, "models.cache_dir": str(model_cache), **overrides}


def tiny_federation_config(root: Path, model_cache: Path, **overrides: Any) -> Config:
    return load_config(
        overrides={"data_root": str(root), **tiny_federation_settings(model_cache, **overrides)}
    )


def cli_options(root: Path, settings: dict[str, Any]) -> list[str]:
    """`pfi-rag` global options for a data root and settings: ``--data-root ROOT --set key=value ...``."""
    return ["--data-root", str(root)] + [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
