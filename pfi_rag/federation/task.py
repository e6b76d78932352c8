"""One client's part of a round: load, DP-train on local data, return only the noisy shared update.

Pure functions of (config, client id, global arrays): the Flower ClientApp is a thin wrapper
around :func:`train_round`. Everything but the outgoing update stays on the client's disk:
its documents, its personal adapter part, its privacy ledger.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfi_rag.config import CLIENT_SETTINGS_FILE, Config, with_client_settings
from pfi_rag.data.records import load_client_data
from pfi_rag.federation.strategies import shared_predicate
from pfi_rag.models.adapters import client_adapter_dir, read_adapter_info, save_adapter
from pfi_rag.models.lora import attach_lora, load_lora_arrays, lora_arrays
from pfi_rag.storage import client_dir

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


def proximal_pull(model, anchor: dict[str, np.ndarray], *, learning_rate: float, strength: float):
    """Ditto's proximal term as a step after each DP step: w <- w - lr * lambda * (w - anchor).

    It reads only the weights and the global anchor, never the data, so it keeps the DP
    guarantee of the noised gradient step it follows (post-processing).
    """
    import torch

    targets = [
        (parameter, torch.as_tensor(anchor[name], dtype=parameter.dtype, device=parameter.device))
        for name, parameter in lora_parameters(model).items()
        if name in anchor
    ]

    def pull() -> None:
        with torch.no_grad():
            for parameter, target in targets:
                parameter.sub_(learning_rate * strength * (parameter - target))

    return pull


def lora_parameters(model) -> dict:
    """The adapter's trainable parameters under the names lora_arrays() uses."""
    names = set(lora_arrays(model))
    found = {}
    for name, parameter in model.named_parameters():
        key = name.replace(".default.weight", ".weight")
        if key in names:
            found[key] = parameter
    return found


def train_round(
    cfg: Config, client_id: str, global_shared: dict[str, np.ndarray], server_round: int
) -> RoundResult | SatOut:
    """DP-train on the client's data beside the global shared part; return the outgoing update.

    ``fedavg``/``fedsa``: one DP training from (personal part + global shared part); the result
    is both the update's source and the saved personal adapter. ``ditto``: a DP training of the
    global adapter gives the update, and a second one of the personal adapter, pulled towards
    the global, is saved; each takes half of the round's epsilon.
    """
    from pfi_rag.privacy import BudgetExceeded, PrivacyLedger, build_outgoing_update, train_adapter

    cfg = with_client_settings(cfg, client_dir(cfg.data_root, client_id) / CLIENT_SETTINGS_FILE)
    strategy = cfg.federation.strategy
    root = cfg.data_root
    data = load_client_data(root, client_id)
    ledger = PrivacyLedger.open(root, client_id, cfg.privacy)
    epsilon = cfg.privacy.epsilon_per_round / 2 if strategy == "ditto" else None
    private_metrics = cfg.privacy.round_metrics == "private"

    def dp_train(model, after_step=None, release_metrics=False):
        # No seed: sampling and noise come from the OS, so the server cannot regenerate them.
        return train_adapter(
            model,
            tokenizer,
            documents=data.documents,
            instructions=data.instructions,
            cfg=cfg.privacy,
            ledger=ledger,
            epsilon=epsilon,
            after_step=after_step,
            release_metrics=release_metrics,
        )

    started = time.perf_counter()
    model, tokenizer, _ = fresh_adapter(cfg)
    personal = read_adapter_arrays(client_adapter_dir(root, client_id))
    if personal is not None and strategy != "ditto":
        load_lora_arrays(model, personal)
    load_lora_arrays(model, global_shared)  # the shared part comes from the server
    before = lora_arrays(model)
    try:
        result = dp_train(model, release_metrics=private_metrics)
    except BudgetExceeded as exc:
        return SatOut(reason=str(exc))
    after = lora_arrays(model)
    save_personal = True
    if strategy == "ditto":
        load_lora_arrays(model, personal if personal is not None else global_shared)
        pull = proximal_pull(
            model,
            global_shared,
            learning_rate=cfg.privacy.learning_rate,
            strength=cfg.federation.ditto_lambda,
        )
        try:
            dp_train(model, after_step=pull)
        except BudgetExceeded:
            save_personal = False  # the global update is paid for; the personal adapter stays as it was
    outgoing = build_outgoing_update(
        before,
        after,
        shared_predicate(strategy),
        clip_norm=cfg.federation.client_clip_norm,
        noise_multiplier=cfg.federation.client_noise_multiplier,
        rng=np.random.default_rng(),  # OS entropy, for the same reason as the training's
        privacy_meta=ledger_meta(result, ledger),
    )
    if save_personal:
        save_adapter(model, client_adapter_dir(root, client_id), round=server_round, source="federated")
    if private_metrics:
        metrics = dict(result.released_metrics)
    else:  # privacy.round_metrics = "exact": the client chose to tell a trusted server
        metrics = {
            "num-examples": float(result.records),
            "loss-before": float(result.loss_before),
            "loss-after": float(result.loss_after),
            "train-seconds": time.perf_counter() - started,
        }
    privacy = {key: value for key, value in outgoing.metadata.items() if value is not None}
    privacy["round_metrics"] = "private" if private_metrics else "exact"
    if private_metrics:
        privacy["round_metrics_noise"] = cfg.privacy.round_metrics_noise
        privacy["round_metrics_loss_clip"] = cfg.privacy.round_metrics_loss_clip
    return RoundResult(update=outgoing.arrays, metrics=metrics, privacy=privacy)


def ledger_meta(result, ledger) -> dict:
    """The update's privacy metadata, with the client's epsilon as the ledger holds it now
    (for Ditto, after both of the round's trainings)."""
    return result.privacy_meta() | {"epsilon": ledger.epsilon_spent}
