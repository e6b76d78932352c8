"""Aggregation of client updates: weighted FedAvg, robust options, and client-level DP.

Updates are deltas of the shared adapter part (``name -> array``), never full weights: the
server adds the aggregate to its global arrays. All functions are pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


class InconsistentUpdates(ValueError):
    """Updates that cannot be aggregated together (different names or shapes)."""


def check_consistent(updates: Sequence[Arrays]) -> list[str]:
    if not updates:
        raise InconsistentUpdates("no updates to aggregate")
    names = sorted(updates[0])
    for index, update in enumerate(updates[1:], start=1):
        if sorted(update) != names:
            raise InconsistentUpdates(f"update {index} carries different arrays than update 0")
        for name in names:
            if update[name].shape != updates[0][name].shape:
                raise InconsistentUpdates(f"update {index}: {name} has shape {update[name].shape}")
    return names


def global_norm(arrays: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())))


def clip_to_norm(arrays: Arrays, max_norm: float) -> Arrays:
    """Scale ``arrays`` so their joint L2 norm is at most ``max_norm``."""
    norm = global_norm(arrays)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {name: (a * scale).astype(np.float32) for name, a in arrays.items()}


def cosine(a: Arrays, b: Arrays) -> float:
    dot = sum(float(np.sum(a[n].astype(np.float64) * b[n])) for n in a)
    denominator = global_norm(a) * global_norm(b)
    return dot / denominator if denominator > 0 else 0.0


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    names = check_consistent(updates)
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise InconsistentUpdates("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return {
        n: sum(wi * u[n].astype(np.float64) for wi, u in zip(w, updates, strict=True)).astype(np.float32)
        for n in names
    }


def coordinate_median(updates: Sequence[Arrays]) -> Arrays:
    names = check_consistent(updates)
    return {n: np.median(np.stack([u[n] for u in updates]), axis=0).astype(np.float32) for n in names}


def trimmed_mean(updates: Sequence[Arrays], trim_fraction: float) -> Arrays:
    """Per coordinate, drop the ``trim_fraction`` largest and smallest values, average the rest."""
    names = check_consistent(updates)
    count = len(updates)
    cut = int(np.floor(trim_fraction * count))
    if count - 2 * cut < 1:
        raise InconsistentUpdates(f"trim fraction {trim_fraction} leaves nothing of {count} updates")
    result = {}
    for n in names:
        stacked = np.sort(np.stack([u[n] for u in updates]), axis=0)
        result[n] = stacked[cut : count - cut].mean(axis=0).astype(np.float32)
    return result


def add_gaussian_noise(arrays: Arrays, std: float, rng: np.random.Generator) -> Arrays:
    return {n: (a + rng.normal(0.0, std, size=a.shape)).astype(np.float32) for n, a in arrays.items()}


def client_level_epsilon(
    noise_multiplier: float, *, sampled: int, population: int, rounds: int, delta: float
) -> float:
    """Epsilon of DP-FedAvg with respect to one client's whole data, for the server's sampling.

    The server samples a fixed number of clients per round without replacement (not Poisson), so
    the neighbouring relation is replace-one-client and the sampled sum moves by up to twice the
    clip norm: each round is a Gaussian of noise multiplier ``noise_multiplier / 2`` on a sample of
    ``sampled`` out of ``population`` drawn without replacement, composed over ``rounds`` with
    dp-accounting's RDP accountant (Wang, Balle & Kasiviswanathan 2019 for the sampling).
    """
    if noise_multiplier <= 0:
        return float("inf")
    if rounds <= 0:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    event = (
        gaussian
        if sampled >= population
        else dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian)
    )
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
