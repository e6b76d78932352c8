"""Shared fixtures: a repo-local model cache, the tiny random Llama with the SmolLM2 tokenizer, one
torch thread, and the HTTP service live on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pfi_rag.config import Config, ModelsConfig

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


@pytest.fixture()
def cli_workdir(isolated_env: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`isolated_env` for in-process CLI runs: models from the test cache, on the CPU (the
    default data root is ``./pfi-data`` under the returned directory)."""
    monkeypatch.setenv("PFI_RAG_MODELS__CACHE_DIR", str(model_cache))
    monkeypatch.setenv("PFI_RAG_MODELS__DEVICE", "cpu")
    return isolated_env


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the module, then the setting as it was.

    The tiny model's ops last microseconds: a second intra-op thread buys nothing, and on a
    loaded 2-core machine its spin-waits cost ~5x the CPU time (measured: 5 LoRA steps 2.5 s
    of CPU on two threads, 0.5 s on one; decoding ~5x slower).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Live:
    """The service running on loopback, its config, and an API key per client (``"admin"``: the
    admin key); :meth:`call` sends a request with a client's key."""

    url: str
    app: Any  # the FastAPI app; app.state.services holds what the routes use
    cfg: Config
    keys: dict[str, str]
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        # No generous timeout is a test of speed: a loaded 2-core machine decodes slowly.
        self.http = httpx.Client(base_url=self.url, timeout=300)

    @property
    def root(self) -> Path:
        return Path(self.cfg.data_root)

    @property
    def services(self):
        return self.app.state.services

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def call(self, method: str, path: str, who: str | None = "alice", **kwargs) -> httpx.Response:
        headers = {**(self.headers(who) if who else {}), **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def live_service(tiny_models_config: ModelsConfig, embedder, one_torch_thread):
    """Starts the HTTP service (real uvicorn on a free loopback port, the tiny generator, the real
    embedder): ``with live_service(root, clients=("alice", "bob"), serving=ServingConfig(...)) as
    live``; other keywords are Config sections, ``app_options`` go to ``create_app``."""
    from pfi_rag.api import create_app
    from pfi_rag.api.auth import KeyStore, keys_path
    from pfi_rag.api.server import ServerThread

    @contextmanager
    def start(
        root: Path,
        *,
        clients: tuple[str, ...] = ("alice",),
        admin: bool = False,
        app_options: dict[str, Any] | None = None,
        **sections: Any,
    ) -> Iterator[Live]:
        cfg = Config(data_root=root, models=tiny_models_config, **sections)
        store = KeyStore(keys_path(root, cfg.serving.keys_file))
        keys = {client: store.create(client)[0] for client in clients}
        if admin:
            keys["admin"] = store.create(None, admin=True)[0]
        app = create_app(cfg, embedder=embedder, **(app_options or {}))
        with ServerThread(app) as server:
            live = Live(server.url, app, cfg, keys)
            try:
                yield live
            finally:
                live.http.close()

    return start
