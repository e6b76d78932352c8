"""What a server holds for its whole life: models, scheduler, stores, keys, limits, metrics, probes.

Built once in the app's lifespan (models load once per process) and handed to routes by
:mod:`pfi_rag.api.deps`; :meth:`Services.close` stops the scheduler and closes every store.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pfi_rag import layout
from pfi_rag.api.auth import KeyStore, keys_path
from pfi_rag.api.limits import RateLimiter
from pfi_rag.api.metrics import Metrics
from pfi_rag.api.probes import ServeProbes, TextIndex
from pfi_rag.api.stores import StoreRegistry
from pfi_rag.config import Config
from pfi_rag.models import BatchScheduler, Engine

logger = logging.getLogger(__name__)


class DataRootBusy(RuntimeError):
    """Another server already serves this data root."""


def hold_data_root(data_root: Path) -> int:
    """Make the data root owner-only (0700) and lock it for this server; the lock's descriptor.

    One server per data root: a second one would find every client's store locked and answer
    409 to everything while reporting ready. The lock goes when the process does, even killed.
    """
    root = Path(data_root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)  # it holds every client's documents and the key hashes
    fd = os.open(layout.server_lock_file(root), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataRootBusy(
            f"another pfi-rag server (pid {holder}) is already serving {root}; stop it, "
            "or give this one another --data-root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@dataclass
class Services:
    cfg: Config
    engine: Engine
    scheduler: BatchScheduler
    stores: StoreRegistry
    keys: KeyStore
    limiter: RateLimiter
    metrics: Metrics
    probes: ServeProbes
    root_lock: int | None = None  # the data root's server lock (see hold_data_root)
    started_at: int = field(default_factory=lambda: int(time.time()))
    running: bool = True  # False once close() began: readiness fails first

    @classmethod
    def start(cls, cfg: Config, metrics: Metrics, *, embedder=None, engine: Engine | None = None) -> Services:
        """Lock the data root, load the models (unless given), open the stores, start the batching worker."""
        root_lock = hold_data_root(cfg.data_root)
        try:
            return cls._start(cfg, metrics, root_lock, embedder=embedder, engine=engine)
        except BaseException:
            os.close(root_lock)
            raise

    @classmethod
    def _start(cls, cfg: Config, metrics: Metrics, root_lock: int, *, embedder, engine) -> Services:
        from pfi_rag.models.loading import load_embedder

        embedder = embedder if embedder is not None else load_embedder(cfg.models)
        engine = engine if engine is not None else Engine.from_config(cfg)
        texts = TextIndex(cfg.probes.serve_copy_ngram)
        stores = StoreRegistry(cfg.data_root, cfg.retrieval, embedder, texts)
        if cfg.serving.preload_stores:
            logger.info("opened %d client stores", stores.preload())
        scheduler = BatchScheduler(engine).start()
        return cls(
            cfg=cfg,
            engine=engine,
            scheduler=scheduler,
            stores=stores,
            keys=KeyStore(keys_path(cfg.data_root, cfg.serving.keys_file)),
            limiter=RateLimiter(cfg.serving.requests_per_minute),
            metrics=metrics,
            probes=ServeProbes(cfg.probes, texts, engine),
            root_lock=root_lock,
        )

    def close(self) -> None:
        self.running = False
        self.scheduler.stop(timeout=30)
        self.stores.close()
        if self.root_lock is not None:
            os.close(self.root_lock)
            self.root_lock = None
