"""What a client may say about a training round beside its update: a noised count and loss sums.

A federation's dashboard wants each client's record count (to weight its update) and its mean
training loss before and after the round. Exact, those are statistics of the client's records
that no DP guarantee covers. Released here, they are one Gaussian mechanism on the vector

    (n, sum of clipped losses before / clip, sum of clipped losses after / clip)

where each record's loss is clipped to ``[0, clip]`` and the two sums run over a sample S of
``m = min(n, sample)`` records drawn without replacement (``privacy.round_metrics_sample``), the
same S before and after training. A fixed-size sample keeps the evaluation's cost, and so when a
client replies, independent of n.

Sensitivity, for the add/remove-one neighbours the ledger accounts (D' = D plus a record x). If
n < sample, S is every record and adding x adds one term to each sum. Otherwise couple the two
samples: draw S' from D'; if x is not in S', S = S' is a uniform m-subset of D; if it is, S is S'
with x replaced by a uniformly drawn record of D outside S', again uniform. Under this coupling S
and S' differ in at most one record, whose clipped loss / clip lies in [0, 1]. So every coordinate
moves by at most 1 and the L2 sensitivity is sqrt(3), as it was for sums over all n records;
noise of std ``z * sqrt(3)`` per coordinate is then a Gaussian mechanism with noise multiplier
``z``. The released distribution is a mixture over the coupling of pairs that each satisfy this
bound, and the divergences the accountants bound (hockey-stick, and exp((a-1) D_a) for Renyi)
are jointly convex, so the mixture satisfies it too. The sample gives amplification that is not
claimed: the release is accounted as one step at sample rate 1 (:func:`release_entry`), composed
by the ledger with the round's DP-SGD steps, and the round's spend is solved with it included.

The means shown are post-processing of the noised values and the public constant ``sample``:
sum / min(noised n, sample). With few records, or a small sample, they are rough: at z = 10,
clip 12 and a sample of 16, one client's mean carries noise of std 13 nats. Averaged over many
clients they are what a federation's loss curve needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SENSITIVITY = math.sqrt(3)  # three coordinates, each moved by at most 1 by one record


def release_entry(noise_multiplier: float) -> tuple[float, float, int]:
    """The release as an accountant history entry: one Gaussian mechanism at sample rate 1."""
    return (noise_multiplier, 1.0, 1)


def noised_round_metrics(
    losses_before: Sequence[float],
    losses_after: Sequence[float],
    *,
    records: int,
    sample: int,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """The released ``num-examples`` (noised ``records``) and ``loss-before``/``loss-after`` (mean
    losses over the sample), from the losses of the ``min(records, sample)`` sampled records."""
    if len(losses_before) != len(losses_after) or len(losses_before) != min(records, sample):
        raise ValueError("need one loss before and one after training for every sampled record")
    std = noise_multiplier * SENSITIVITY
    count = records + rng.normal(0.0, std)
    sums = [
        float(np.clip(np.asarray(losses, dtype=float), 0.0, clip).sum()) / clip + rng.normal(0.0, std)
        for losses in (losses_before, losses_after)
    ]
    shown = max(count, 1.0)  # a weight must be positive; the clamp reads only noised values
    before, after = (min(max(clip * total / min(shown, sample), 0.0), clip) for total in sums)
    return {"num-examples": shown, "loss-before": before, "loss-after": after}


def released_loss_std(
    count: float, loss: float, *, clip: float, noise_multiplier: float, sample: float = math.inf
) -> float:
    """About how far a released mean loss is from the true one (its noise's standard deviation).

    The mean is clip * s / min(n, sample) with s noised by std z * sqrt(3). With the released
    count at or above the sample size the divisor is the constant ``sample`` and the std is
    z * sqrt(3) * clip / sample; below it the count's noise adds in, to first order
    z * sqrt(3) * sqrt(clip^2 + loss^2) / n. Computed from released values only, so the server
    can state it beside each client's numbers. ``sample`` infinite: sums over every record.
    """
    if count >= sample:
        return noise_multiplier * SENSITIVITY * clip / sample
    return noise_multiplier * SENSITIVITY * math.hypot(clip, loss) / max(count, 1.0)
