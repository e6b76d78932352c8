"""Shared fixtures: a repo-local model cache and the tiny random Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pfi_rag.config import ModelsConfig

REPO = Path(__file__).resolve().parent.parent
# Converted models are cached per checkout: the first run converts the GGUF once (~30 s).
MODEL_CACHE = Path(os.environ.get("PFI_RAG_TEST_CACHE", REPO / ".model-cache"))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE


@pytest.fixture(scope="session")
def tiny_models_config(model_cache: Path) -> ModelsConfig:
    return ModelsConfig(generator="tiny-random", device="cpu", cache_dir=model_cache)


@pytest.fixture(scope="session")
def default_models_config(model_cache: Path) -> ModelsConfig:
    return ModelsConfig(device="cpu", cache_dir=model_cache)


@pytest.fixture(scope="session")
def tiny_generator(tiny_models_config: ModelsConfig):
    """(model, tokenizer, runtime) of the tiny random Llama, loaded once per test session."""
    from pfi_rag.models.loading import load_generator

    return load_generator(tiny_models_config)


@pytest.fixture(scope="session")
def embedder(default_models_config: ModelsConfig):
    from pfi_rag.models.loading import load_embedder

    return load_embedder(default_models_config)


@pytest.fixture()
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in an empty directory with no PFI_RAG_* variables, so no stray config leaks in."""
    for key in list(os.environ):
        if key.startswith("PFI_RAG_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path
