"""One client's part of a round: load, DP-train on local data, return only the noisy shared update.

Pure functions of (config, client id, global arrays): the Flower ClientApp is a thin wrapper
around :func:`train_round`. Everything but the outgoing update stays on the client's disk:
its documents, its personal adapter part, its privacy ledger.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfi_rag.config import Config
from pfi_rag.data.records import load_client_data
from pfi_rag.federation.strategies import shared_predicate
from pfi_rag.models.adapters import client_adapter_dir, read_adapter_info, save_adapter
from pfi_rag.models.lora import attach_lora, load_lora_arrays, lora_arrays

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class RoundResult:
    update: dict[str, np.ndarray]
    metrics: dict[str, float]
    privacy: dict[str, float | str]


@dataclass
class SatOut:
    reason: str


@functools.lru_cache(maxsize=2)
def _cached_base(models_json: str, adapter_json: str):
    """The base model with a fresh seeded adapter, loaded once per process (Flower rebuilds
    ClientApps every round, but a simulation actor or SuperNode process lives on)."""
    from pfi_rag.config import AdapterConfig, ModelsConfig
    from pfi_rag.models.loading import load_generator

    model, tokenizer, _ = load_generator(ModelsConfig.model_validate_json(models_json))
    peft_model = attach_lora(model, AdapterConfig.model_validate_json(adapter_json), seed=0)
    return peft_model, tokenizer, lora_arrays(peft_model)


def fresh_adapter(cfg: Config):
    """``(peft_model, tokenizer, initial_arrays)``; the model's adapter is reset to the seeded init."""
    peft_model, tokenizer, initial = _cached_base(cfg.models.model_dump_json(), cfg.adapter.model_dump_json())
    load_lora_arrays(peft_model, initial)
    return peft_model, tokenizer, copy.deepcopy(initial)


def read_adapter_arrays(directory: Path) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    if read_adapter_info(directory) is None:
        return None
    return load_file(str(Path(directory) / ADAPTER_WEIGHTS))


def train_round(
    cfg: Config, client_id: str, global_shared: dict[str, np.ndarray], server_round: int
) -> RoundResult | SatOut:
    from pfi_rag.privacy import BudgetExceeded, PrivacyLedger, build_outgoing_update, train_adapter

    strategy = cfg.federation.strategy
    root = cfg.data_root
    data = load_client_data(root, client_id)
    ledger = PrivacyLedger.open(root, client_id, cfg.privacy)
    model, tokenizer, _ = fresh_adapter(cfg)
    personal = read_adapter_arrays(client_adapter_dir(root, client_id))
    if personal is not None:
        load_lora_arrays(model, personal)
    load_lora_arrays(model, global_shared)  # the shared part comes from the server
    before = lora_arrays(model)
    model.train()  # the cached model may have been left in eval mode by a previous round
    seed = hash((cfg.seed, client_id, server_round)) % 2**31
    try:
        result = train_adapter(
            model,
            tokenizer,
            documents=data.documents,
            instructions=data.instructions,
            cfg=cfg.privacy,
            ledger=ledger,
            seed=seed,
        )
    except BudgetExceeded as exc:
        return SatOut(reason=str(exc))
    after = lora_arrays(model)
    outgoing = build_outgoing_update(
        before,
        after,
        shared_predicate(strategy),
        clip_norm=cfg.federation.client_clip_norm,
        noise_multiplier=cfg.federation.client_noise_multiplier,
        rng=np.random.default_rng(seed),
        privacy_meta=result.privacy_meta(),
    )
    save_adapter(model, client_adapter_dir(root, client_id), round=server_round, source="federated")
    metrics = {
        "num-examples": float(result.records),
        "loss-before": float(result.loss_before),
        "loss-after": float(result.loss_after),
    }
    privacy = {key: value for key, value in outgoing.metadata.items() if value is not None}
    return RoundResult(update=outgoing.arrays, metrics=metrics, privacy=privacy)
