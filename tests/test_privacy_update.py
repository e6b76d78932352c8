"""The outgoing update: shared names only, clipped, noised, with configured metadata only; nothing else."""

import numpy as np
import pytest

from pfi_rag.models.lora import is_lora_a
from pfi_rag.privacy import OutgoingUpdate, PrivacyError, TrainResult, build_outgoing_update


def trained(noise_multiplier: float | None = 1.1, epsilon: float = 2.0) -> TrainResult:
    """A training's result as build_outgoing_update sees it (only whether it was private matters)."""
    return TrainResult(
        loss_before=3.0, loss_after=2.0, epsilon=epsilon, epsilon_total=epsilon, delta=1e-5,
        noise_multiplier=noise_multiplier, max_grad_norm=1.0, sample_rate=0.1, steps=10, empty_steps=0,
        tokens=100, records=68, accountant="pld", grad_sample_mode="hooks", seconds=1.0,
    )  # fmt: skip


META = trained()
A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def arrays(a: float, b: float) -> dict[str, np.ndarray]:
    return {A: np.full((2, 4), a, dtype=np.float32), B: np.full((4, 2), b, dtype=np.float32)}


def test_fedsa_sends_only_lora_a_as_a_clipped_delta_with_metadata():
    # Prepare: delta of A is 3.0 in 8 cells -> norm sqrt(72); clipped to 1.5
    before, after = arrays(1.0, 0.0), arrays(4.0, 5.0)

    # Execute
    update = build_outgoing_update(
        before, after, is_lora_a, clip_norm=1.5, noise_multiplier=0.0, rng=np.random.default_rng(0),
        trained=META,
    )  # fmt: skip

    # Assert
    assert isinstance(update, OutgoingUpdate) and set(update.arrays) == {A}
    np.testing.assert_allclose(update.arrays[A], np.full((2, 4), 3.0 * 1.5 / np.sqrt(72)), rtol=1e-6)
    assert update.arrays[A].dtype == np.float32
    # Configured values only: nothing of the training (sample rate, sigma, epsilon reveal n).
    assert update.metadata == {"update_clip_norm": 1.5, "update_noise_multiplier": 0.0}


def test_fedavg_update_is_noised_at_sigma_times_clip():
    before, after = arrays(0.0, 0.0), arrays(0.0, 0.0)
    big = {A: np.zeros((100, 100), np.float32), B: np.zeros((100, 100), np.float32)}
    update = build_outgoing_update(
        big, big, {A, B}, clip_norm=0.5, noise_multiplier=2.0, rng=np.random.default_rng(0), trained=META
    )
    values = np.concatenate([v.ravel() for v in update.arrays.values()])
    assert np.std(values) == pytest.approx(1.0, rel=0.03)  # 2.0 * 0.5
    unclipped = build_outgoing_update(
        before, after, {A, B}, clip_norm=None, noise_multiplier=0.0, rng=np.random.default_rng(0),
        trained=META,
    )  # fmt: skip
    assert set(unclipped.arrays) == {A, B} and unclipped.metadata["update_clip_norm"] == 0.0


@pytest.mark.parametrize(
    "change",
    [
        {"trained": trained(noise_multiplier=None, epsilon=float("inf"))},  # not DP-trained
        {"trained": trained(noise_multiplier=0.0, epsilon=float("inf"))},  # clipped, no noise
        {"noise_multiplier": 1.0, "clip_norm": None},  # noise with nothing to calibrate to
        {"shared": set()},  # nothing shared
        {"after": {A: np.zeros((2, 4), np.float32)}},  # different names
        {"after": arrays(np.nan, 0.0)},  # broken update
    ],
)
def test_anything_but_a_private_update_is_refused(change):
    kwargs = {
        "before": arrays(0.0, 0.0),
        "after": arrays(1.0, 1.0),
        "shared": {A, B},
        "clip_norm": 1.0,
        "noise_multiplier": 0.0,
        "rng": np.random.default_rng(0),
        "trained": META,
    } | change
    with pytest.raises(PrivacyError):
        build_outgoing_update(kwargs.pop("before"), kwargs.pop("after"), kwargs.pop("shared"), **kwargs)
