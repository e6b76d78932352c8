"""The config of a federation on the tiny model that finishes in seconds (shared by the federation,
task and privacy-boundary tests)."""

from __future__ import annotations

from pathlib import Path

from pfi_rag.config import Config, load_config


def tiny_federation_config(root: Path, model_cache: Path, **overrides) -> Config:
    return load_config(
        overrides={
            "data_root": str(root),
            "models.generator": "tiny-random",
            "models.device": "cpu",
            "models.cache_dir": str(model_cache),
            "privacy.local_steps": 2,
            "privacy.batch_size": 4,
            "privacy.max_seq_len": 48,
            "privacy.epsilon_per_round": 4.0,
            "privacy.epsilon_max": 100.0,
            **overrides,
        }
    )
