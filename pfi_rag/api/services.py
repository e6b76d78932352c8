"""What a server holds for its whole life: models, scheduler, stores, keys, limits, metrics, probes.

Built once in the app's lifespan (models load once per process) and handed to routes by
:mod:`pfi_rag.api.deps`; :meth:`Services.close` stops the scheduler and closes every store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pfi_rag.api.auth import KeyStore, keys_path
from pfi_rag.api.limits import RateLimiter
from pfi_rag.api.metrics import Metrics
from pfi_rag.api.probes import ServeProbes, TextIndex
from pfi_rag.api.stores import StoreRegistry
from pfi_rag.config import Config
from pfi_rag.models import BatchScheduler, Engine

logger = logging.getLogger(__name__)


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
    running: bool = True  # False once close() began: readiness fails first

    @classmethod
    def start(cls, cfg: Config, metrics: Metrics, *, embedder=None, engine: Engine | None = None) -> Services:
        """Load the models (unless given), open the stores to preload, start the batching worker."""
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
        )

    def close(self) -> None:
        self.running = False
        self.scheduler.stop(timeout=30)
        self.stores.close()
