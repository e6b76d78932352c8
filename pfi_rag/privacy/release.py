"""A client's private probe release: one clipped, Gaussian-noised metric vector, charged to its ledger.

Each client runs its probes locally and keeps the exact results (they never leave it). What it
releases is one vector per probe run: every metric is clipped to its probe's declared range
``[lo, hi]`` and scaled to ``[0, 1]``, so replacing *all* of the client's data moves the vector by
at most ``sqrt(d)`` in L2 (client-level sensitivity, which covers one record too). The Gaussian
mechanism adds N(0, sigma^2) per coordinate, with sigma = z * sqrt(d) and the noise multiplier z
solved against the client's ledger so that the release raises its composed epsilon by at most
``epsilon``. The release is then one entry ``(z, 1.0, 1)`` of the ledger's history, composed with
every DP-SGD step and metric release by the ledger's accountant, and counted against the
client's budget like any other spend; a release the budget cannot pay is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pfi_rag.config import PrivacyConfig
from pfi_rag.privacy.accounting import noise_for_spend
from pfi_rag.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class Release:
    """One client's noised metric vector, as the server receives it."""

    client: str
    values: dict[str, float]  # "probe.metric" -> noisy value in the metric's own units
    sigmas: dict[str, float]  # "probe.metric" -> noise sd in the metric's own units
    epsilon: float  # what this release took from the client's budget (at most the one asked)
    delta: float  # the client's ledger's delta
    sigma_unit: float  # sd on the [0, 1]-scaled coordinates
    epsilon_spent_total: float  # the client's composed epsilon after it, every kind of spend included


def release_metrics(
    data_root: Path,
    client_id: str,
    cfg: PrivacyConfig,
    exact: dict[str, float],
    bounds: dict[str, tuple[float, float]],
    *,
    epsilon: float,
    rng: np.random.Generator,
) -> Release:
    """Clip, scale and noise one client's metrics, charging ``epsilon`` to its ledger.

    Raises :class:`~pfi_rag.privacy.errors.BudgetExceeded` (nothing released or written) when the
    client's budget cannot pay it.
    """
    keys = sorted(exact)
    if not keys:
        raise ValueError(f"client {client_id!r} has no metric to release")
    ledger = PrivacyLedger.open(data_root, client_id, cfg)
    with ledger.locked():
        ledger.check_remaining(epsilon)
        delta = ledger.delta_for(None)
        z = noise_for_spend(
            ledger.history, epsilon=epsilon, sample_rate=1.0, steps=1, delta=delta, mechanism=ledger.mechanism
        )
        sigma_unit = z * math.sqrt(len(keys))  # every scaled coordinate may move by its full range
        values, sigmas = {}, {}
        for key in keys:
            lo, hi = bounds[key]
            true = min(max(exact[key], lo), hi)
            scaled = (true - lo) / (hi - lo) + rng.normal(0.0, sigma_unit)
            values[key] = lo + scaled * (hi - lo)
            sigmas[key] = sigma_unit * (hi - lo)
        spend = ledger.commit_release((z, 1.0, 1), records=0, kind="probe-release")
    return Release(
        client=client_id,
        values=values,
        sigmas=sigmas,
        epsilon=spend.epsilon_spent,
        delta=delta,
        sigma_unit=sigma_unit,
        epsilon_spent_total=spend.epsilon_after,
    )


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The delta the Gaussian mechanism with noise ``sigma`` achieves at ``epsilon`` (Balle & Wang 2018)."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest sigma with ``gaussian_delta(sigma) <= delta`` for one Gaussian alone (bisection)."""
    if epsilon <= 0 or not 0 < delta < 1 or sensitivity <= 0:
        raise ValueError("need epsilon > 0, 0 < delta < 1 and sensitivity > 0")
    low, high = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(high, epsilon, sensitivity) > delta:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        if gaussian_delta(mid, epsilon, sensitivity) > delta:
            low = mid
        else:
            high = mid
    return high


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))
