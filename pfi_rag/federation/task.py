"""One client's part of a round: load, DP-train on local data, return only the noisy shared update.

Pure functions of (config, client id, global arrays): the Flower ClientApp is a thin wrapper
around :func:`train_round`. Everything but the reply below stays on the client's disk: its
documents, its personal adapter part, its privacy ledger, its log.

What a client's train reply carries, completely (``privacy.round_metrics = "private"``). Each field
is DP-noised or fixed by configuration; none is computed from the client's records, so two clients
that differ in one record send replies that differ only in the noised values:

- ``update`` (ArrayRecord): the shared adapter part's delta after DP-SGD (record-level DP: clipped,
  Poisson-sampled, noised steps); names, shapes and dtype fixed by the model and strategy;
  optionally clipped to ``federation.client_clip_norm`` and noised again.
- ``metrics`` (MetricRecord): ``num-examples``, ``loss-before``, ``loss-after``, released through the
  Gaussian mechanism (:mod:`pfi_rag.privacy.round_metrics`) and charged to the ledger.
- ``privacy`` (ConfigRecord), configuration only: ``status`` ("ok"); ``accountant`` and ``delta`` (the
  ledger's, fixed constants); ``epsilon_per_round`` or, when the noise is configured instead,
  ``noise_multiplier``; ``max_grad_norm``; ``local_steps``; ``round_metrics``,
  ``round_metrics_noise``, ``round_metrics_loss_clip``, ``round_metrics_sample``; ``update_clip_norm``,
  ``update_noise_multiplier``.

Not sent: the record count, the training's sample rate, noise multiplier or epsilon spent (each
solved from, or a function of, the record count), timings, and any exception text. A client that
cannot take part sends only ``privacy`` = ``{status: "sat_out" | "failed", error: CODE}`` with a code
from :data:`FAILURE_CODES`; the full exception goes to the client's own log
(``clients/<id>/logs/federation.log``). With ``privacy.round_metrics = "exact"`` (a trusted server,
not private) the metrics are exact and add ``train-seconds``.

When the reply is sent is not fixed by the protocol. The round metrics are evaluated on a fixed
number of records (``privacy.round_metrics_sample``), so that part costs the same for every
client; what still varies with the record count is listed in docs/federation.md ("When a client
replies"). Each round's per-phase wall times go to the client's own
``clients/<id>/logs/federation-timings.jsonl``, never to the server.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfi_rag import layout
from pfi_rag.config import Config, with_client_settings
from pfi_rag.data.audit_canaries import audit_training_documents
from pfi_rag.data.corpus import load_corpus, require_training_data, too_little_data, warn_locally
from pfi_rag.federation.protocol import (  # noqa: F401 - FAILURE_CODES: re-exported, the clients' vocabulary
    FAILURE_CODES,
    LOSS_AFTER,
    LOSS_BEFORE,
    NUM_EXAMPLES,
    OK,
    STATUS,
    TRAIN_SECONDS,
)
from pfi_rag.federation.strategies import shared_predicate
from pfi_rag.models.adapters import read_adapter_info, save_adapter
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
    reason: str  # a code from FAILURE_CODES


def failure_code(exc: BaseException) -> str:
    """The code a client sends for ``exc``; the exception itself stays in the client's log."""
    from pfi_rag.config import ConfigError
    from pfi_rag.privacy import BudgetExceeded, PrivacyError

    if isinstance(exc, BudgetExceeded):
        return "budget_exhausted"
    if isinstance(exc, ConfigError):
        return "bad_local_settings"
    if isinstance(exc, PrivacyError):
        return "privacy_refused"
    if isinstance(exc, (ValueError, OSError, UnicodeError)):
        return "bad_local_data"
    return "training_failed"


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

    phases = Phases()
    cfg = with_client_settings(cfg, layout.client_settings_file(cfg.data_root, client_id))
    strategy = cfg.federation.strategy
    root = cfg.data_root
    # The client's store (current versions; its held-out share is never trained on).
    data = load_corpus(root, client_id, held_out_share=cfg.data.held_out_share)
    require_training_data(data)
    if warning := too_little_data(data, cfg.privacy.batch_size):
        warn_locally(root, client_id, warning)  # what to change, told on the client's side only
    # Audit canaries (privacy.audit_canaries, opt-in): extra DP training records, never indexed.
    canaries = audit_training_documents(root, client_id, cfg.privacy)
    ledger = PrivacyLedger.open(root, client_id, cfg.privacy)
    adapter_info = read_adapter_info(layout.client_adapter_dir(root, client_id))
    ledger.check_absorbed(adapter_info.epsilon if adapter_info is not None else None)
    epsilon = cfg.privacy.epsilon_per_round / 2 if strategy == "ditto" else None
    private_metrics = cfg.privacy.round_metrics == "private"

    def dp_train(model, after_step=None, release_metrics=False, evaluate=False):
        # No seed: sampling and noise come from the OS, so the server cannot regenerate them.
        # evaluate: exact metrics need the losses over every record; a release evaluates its own
        # fixed-size sample; Ditto's personal training needs no losses at all.
        return train_adapter(
            model,
            tokenizer,
            documents=[*data.train, *canaries],
            instructions=data.instructions,
            cfg=cfg.privacy,
            ledger=ledger,
            epsilon=epsilon,
            after_step=after_step,
            release_metrics=release_metrics,
            evaluate=evaluate,
        )

    phases.lap("setup")
    model, tokenizer, _ = fresh_adapter(cfg)
    personal = read_adapter_arrays(layout.client_adapter_dir(root, client_id))
    if personal is not None and strategy != "ditto":
        load_lora_arrays(model, personal)
    load_lora_arrays(model, global_shared)  # the shared part comes from the server
    before = lora_arrays(model)
    phases.lap("model")
    try:
        result = dp_train(model, release_metrics=private_metrics, evaluate=not private_metrics)
    except BudgetExceeded:
        return SatOut(reason="budget_exhausted")
    phases.add(result.phases)
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
            phases.add(dp_train(model, after_step=pull).phases)
        except BudgetExceeded:
            save_personal = False  # the global update is paid for; the personal adapter stays as it was
    outgoing = build_outgoing_update(
        before,
        after,
        shared_predicate(strategy),
        clip_norm=cfg.federation.client_clip_norm,
        noise_multiplier=cfg.federation.client_noise_multiplier,
        rng=np.random.default_rng(),  # OS entropy, for the same reason as the training's
        trained=result,
    )
    phases.lap("update")
    if save_personal:
        save_adapter(
            model,
            layout.client_adapter_dir(root, client_id),
            round=server_round,
            source="federated",
            epsilon=ledger.epsilon_spent,
        )
    phases.lap("save")
    if private_metrics:
        metrics = dict(result.released_metrics)
    else:  # privacy.round_metrics = "exact": the client chose to tell a trusted server
        metrics = {
            NUM_EXAMPLES: float(result.records),
            LOSS_BEFORE: float(result.loss_before),
            LOSS_AFTER: float(result.loss_after),
            TRAIN_SECONDS: phases.total(),
        }
    privacy = reply_privacy(cfg, ledger) | outgoing.metadata
    log_timings(root, client_id, server_round, phases, evaluated=result.evaluated)
    return RoundResult(update=outgoing.arrays, metrics=metrics, privacy=privacy)


class Phases:
    """Wall seconds per phase of a client's round, laps of one clock (local only)."""

    def __init__(self) -> None:
        self.started = self._clock = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, timed: dict[str, float]) -> None:
        """Add phases timed elsewhere (a training's); they count as part of the current lap."""
        for phase, seconds in timed.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self._clock += sum(timed.values())

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._clock
        self._clock = now

    def total(self) -> float:
        return time.perf_counter() - self.started


def log_timings(root: Path, client_id: str, server_round: int, phases: Phases, *, evaluated: int) -> None:
    """Append the round's phase timings to the client's own timings log (see layout): where a
    round's time goes, for its operator and ``bench/federation.py``. ``pid`` tells the simulation
    worker or SuperNode process that ran it apart from others."""
    entry = {
        "round": server_round,
        "pid": os.getpid(),
        "total": phases.total(),
        "evaluated": evaluated,
        "phases": {phase: round(seconds, 4) for phase, seconds in phases.seconds.items()},
    }
    path = layout.client_timings_file(root, client_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def reply_privacy(cfg: Config, ledger) -> dict[str, float | int | str]:
    """The reply's ``privacy`` record: configuration and the ledger's fixed terms only (see the
    module docstring); nothing here may be computed from the client's records."""
    privacy = cfg.privacy
    record: dict[str, float | int | str] = {
        STATUS: OK,
        "accountant": ledger.mechanism,
        "delta": float(ledger.delta if ledger.delta is not None else privacy.delta),
        "max_grad_norm": privacy.max_grad_norm,
        "local_steps": privacy.local_steps,
        "round_metrics": privacy.round_metrics,
    }
    if privacy.noise_multiplier is None:
        record["epsilon_per_round"] = privacy.epsilon_per_round
    else:
        record["noise_multiplier"] = privacy.noise_multiplier
    if privacy.round_metrics == "private":
        record["round_metrics_noise"] = privacy.round_metrics_noise
        record["round_metrics_loss_clip"] = privacy.round_metrics_loss_clip
        record["round_metrics_sample"] = privacy.round_metrics_sample
    return record
