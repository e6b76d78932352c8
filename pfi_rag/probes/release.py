"""Privacy-preserving probe mode: a client releases only a clipped, Gaussian-noised metric vector.

Each client runs its probes locally and keeps the exact results under
``clients/<id>/probes/`` (they never leave it). What it releases is one vector per probe run:
every released metric is clipped to its probe's declared range ``[lo, hi]`` and scaled to
``[0, 1]``, so replacing *all* of the client's data moves the vector by at most
``sqrt(d)`` in L2 (client-level sensitivity, the same unit as the federation's client-level
DP). The Gaussian mechanism then adds N(0, sigma^2) per coordinate, with sigma from the
analytic Gaussian mechanism (Balle & Wang 2018), which is exact for any epsilon (the
classic ``sqrt(2 ln(1.25/delta))/epsilon`` holds only for epsilon < 1). Each release spends
``(epsilon, delta)`` of the client's own budget and is appended to its release ledger
``clients/<id>/probes/releases.json``; spends add up (basic composition).

The server sees only releases: it reports distributions (worst client, percentiles, mean)
of noisy values and states sigma in each metric's units. Every order statistic of the noisy
values lies within ``TOLERANCE_Z x sigma`` of the same statistic of the clipped true values
whenever each coordinate's noise does (probability >= 1 - 6.3e-5 per coordinate at z=4).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np

from pfi_rag.storage import atomic_write_json, client_dir, read_json

TOLERANCE_Z = 4.0  # stated bound on |noisy - clipped true| per value, in sigmas


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The delta the Gaussian mechanism with noise ``sigma`` achieves at ``epsilon`` (Balle & Wang)."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest sigma with ``gaussian_delta(sigma) <= delta`` (bisection; delta falls with sigma)."""
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


@dataclass(frozen=True)
class Release:
    """One client's noised metric vector, as the server receives it."""

    client: str
    values: dict[str, float]  # "probe.metric" -> noisy value in the metric's own units
    sigmas: dict[str, float]  # "probe.metric" -> noise sd in the metric's own units
    epsilon: float
    delta: float
    sigma_unit: float  # sd on the [0, 1]-scaled coordinates
    epsilon_spent_total: float  # this client's probe releases so far, this one included


def release_metrics(
    client_id: str,
    exact: dict[str, float],
    bounds: dict[str, tuple[float, float]],
    *,
    epsilon: float,
    delta: float,
    rng: np.random.Generator,
) -> tuple[Release, dict[str, float]]:
    """Clip, scale and noise one client's metrics; returns the release and the clipped true values."""
    keys = sorted(exact)
    if not keys:
        raise ValueError(f"client {client_id!r} has no metric to release")
    sensitivity = math.sqrt(len(keys))  # every scaled coordinate may move by its full [0, 1] range
    sigma_unit = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    values, sigmas, clipped = {}, {}, {}
    for key in keys:
        lo, hi = bounds[key]
        true = min(max(exact[key], lo), hi)
        clipped[key] = true
        scaled = (true - lo) / (hi - lo) + rng.normal(0.0, sigma_unit)
        values[key] = lo + scaled * (hi - lo)
        sigmas[key] = sigma_unit * (hi - lo)
    release = Release(
        client=client_id,
        values=values,
        sigmas=sigmas,
        epsilon=epsilon,
        delta=delta,
        sigma_unit=sigma_unit,
        epsilon_spent_total=epsilon,
    )
    return release, clipped


def record_release(data_root, release: Release) -> Release:
    """Append the spend to the client's release ledger; returns the release with its running total."""
    path = client_dir(data_root, release.client) / "probes" / "releases.json"
    ledger = read_json(path, default={"releases": []})
    spent = sum(float(item.get("epsilon", 0.0)) for item in ledger["releases"]) + release.epsilon
    ledger["releases"].append(
        {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "epsilon": release.epsilon,
            "delta": release.delta,
            "sigma_unit": release.sigma_unit,
            "metrics": sorted(release.values),
        }
    )
    ledger["epsilon_spent"] = spent
    atomic_write_json(path, ledger)
    return Release(**{**release.__dict__, "epsilon_spent_total": spent})


def distribution(values: list[float], *, fails_above: bool) -> dict[str, float]:
    """Worst client, percentiles and mean of per-client values ("worst" follows the failure side)."""
    x = np.asarray(values, dtype=float)
    return {
        "worst": float(x.max() if fails_above else x.min()),
        "p10": float(np.percentile(x, 10)),
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "mean": float(x.mean()),
        "spread": float(x.max() - x.min()),
        "clients": int(x.size),
    }
