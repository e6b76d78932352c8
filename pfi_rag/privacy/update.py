"""The one thing that may leave a client: the shared part of its adapter as a private delta.

An outgoing update is ``after - before`` over the shared weight names only (fedavg: every LoRA
weight; fedsa: only ``lora_A``), where ``after`` came from DP-SGD training (record-level DP,
recorded in the client's ledger). Optionally the delta is clipped to L2 norm ``clip_norm`` and
Gaussian noise of std ``noise_multiplier * clip_norm`` is added (client-level DP, DP-FedAvg,
McMahan et al. 2018). The metadata holds only configured values, never one computed from the
client's records: not the delta's norm before clipping, nor the training's sample rate, delta,
noise multiplier or epsilon, each of which would tell the server the record count
(:mod:`pfi_rag.federation.task` lists everything a reply carries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pfi_rag.privacy.errors import PrivacyError

if TYPE_CHECKING:
    from pfi_rag.privacy.training import TrainResult

@dataclass(frozen=True)
class OutgoingUpdate:
    """Arrays (name -> float32 delta) and flat metadata (str -> number or string) to send."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, float | int | str] = field(default_factory=dict)


def build_outgoing_update(
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    shared: Callable[[str], bool] | Collection[str],
    *,
    clip_norm: float | None,
    noise_multiplier: float,
    rng: np.random.Generator,
    trained: TrainResult,
) -> OutgoingUpdate:
    """Build the outgoing update; refuses anything not produced by noised DP training.

    ``trained`` is the result of the training that produced ``after``; only its being private
    is checked, nothing of it is sent. ``noise_multiplier > 0`` needs ``clip_norm``: the noise is
    calibrated to it.
    """
    if not trained.private or not math.isfinite(trained.epsilon_total):
        raise PrivacyError("only the result of noised DP training may leave a client (noise_multiplier 0)")
    if noise_multiplier < 0 or (noise_multiplier > 0 and clip_norm is None):
        raise PrivacyError("update noise needs a clip_norm > 0 to be calibrated to")
    if clip_norm is not None and not clip_norm > 0:
        raise PrivacyError(f"clip_norm must be positive, got {clip_norm}")
    if set(before) != set(after):
        raise PrivacyError("before and after hold different weight names")
    is_shared = shared if callable(shared) else set(shared).__contains__
    names = sorted(name for name in after if is_shared(name))
    if not names:
        raise PrivacyError("no weight is shared: nothing to send")

    delta = {}
    for name in names:
        if before[name].shape != after[name].shape:
            raise PrivacyError(f"{name}: shape {before[name].shape} became {after[name].shape}")
        delta[name] = np.asarray(after[name], dtype=np.float64) - np.asarray(before[name], dtype=np.float64)
        if not np.all(np.isfinite(delta[name])):
            raise PrivacyError(f"{name}: the update is not finite")
    if clip_norm is not None:
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))  # flat L2 over all shared
        scale = min(1.0, clip_norm / (norm + 1e-12))
        delta = {name: d * scale for name, d in delta.items()}
    if noise_multiplier > 0:
        std = noise_multiplier * clip_norm
        delta = {name: d + rng.normal(0.0, std, size=d.shape) for name, d in delta.items()}

    metadata: dict[str, float | int | str] = {
        "update_clip_norm": float(clip_norm) if clip_norm is not None else 0.0,  # 0: not clipped
        "update_noise_multiplier": float(noise_multiplier),
    }
    arrays = {name: d.astype(np.float32) for name, d in delta.items()}
    for array in arrays.values():
        array.setflags(write=False)
    return OutgoingUpdate(arrays=arrays, metadata=metadata)
