"""What a client may say about a training round beside its update: noised counts and loss sums.

A federation's dashboard wants each client's record count (to weight its update) and its mean
training loss before and after the round. Exact, those are statistics of the client's records
that no DP guarantee covers. Released here, they are one Gaussian mechanism on the vector

    (n, sum of clipped losses before / clip, sum of clipped losses after / clip)

where each record's loss is clipped to ``[0, clip]``: adding or removing one record moves every
coordinate by at most 1, so the L2 sensitivity is sqrt(3), and noise of std ``z * sqrt(3)`` per
coordinate is a Gaussian mechanism with noise multiplier ``z`` over all records (sample rate 1,
one step). The ledger composes it with the round's DP-SGD steps (:func:`release_entry`), and the
round's spend is solved with it included, so the round still costs the epsilon it was given.

The means shown are ratios of the noised sums (post-processing). With few records they are
rough: at z = 10 the count carries noise of std 17 records. Averaged over many clients they are
what a federation's loss curve needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SENSITIVITY = math.sqrt(3)  # three coordinates, each moved by at most 1 by one record


def release_entry(noise_multiplier: float) -> tuple[float, float, int]:
    """The release as an accountant history entry: a Gaussian mechanism on every record at once."""
    return (noise_multiplier, 1.0, 1)


def noised_round_metrics(
    losses_before: Sequence[float],
    losses_after: Sequence[float],
    *,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """The released ``num-examples``, ``loss-before`` and ``loss-after`` (per-record mean losses)."""
    if len(losses_before) != len(losses_after) or not losses_before:
        raise ValueError("need one loss before and one after training for every record")
    std = noise_multiplier * SENSITIVITY
    count = len(losses_before) + rng.normal(0.0, std)
    sums = [
        float(np.clip(np.asarray(losses, dtype=float), 0.0, clip).sum()) / clip + rng.normal(0.0, std)
        for losses in (losses_before, losses_after)
    ]
    shown = max(count, 1.0)  # a weight must be positive; the clamp reads only noised values
    before, after = (min(max(clip * total / shown, 0.0), clip) for total in sums)
    return {"num-examples": shown, "loss-before": before, "loss-after": after}


def released_loss_std(count: float, loss: float, *, clip: float, noise_multiplier: float) -> float:
    """About how far a released mean loss is from the true one (its noise's standard deviation).

    The mean is clip * s / n with both s and n noised by std z * sqrt(3); to first order its
    std is z * sqrt(3) * sqrt(clip^2 + loss^2) / n. Computed from released values only, so the
    server can state it beside each client's numbers.
    """
    return noise_multiplier * SENSITIVITY * math.hypot(clip, loss) / max(count, 1.0)
