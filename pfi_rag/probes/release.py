"""The server's side of the private probe mode: distributions over clients' noised releases.

Releasing is the privacy package's work (:mod:`pfi_rag.privacy.release`: clip, noise, charge the
client's ledger); the probes only read what was released. The server reports distributions
(worst client, percentiles, mean) of noisy values and states sigma in each metric's units. Every
order statistic of the noisy values lies within ``TOLERANCE_Z x sigma`` of the same statistic of
the clipped true values whenever each coordinate's noise does (probability >= 1 - 6.3e-5 per
coordinate at z=4).
"""

from __future__ import annotations

import numpy as np

from pfi_rag.privacy.release import Release, analytic_gaussian_sigma, gaussian_delta, release_metrics

TOLERANCE_Z = 4.0  # stated bound on |noisy - clipped true| per value, in sigmas

__all__ = [
    "TOLERANCE_Z",
    "Release",
    "analytic_gaussian_sigma",
    "distribution",
    "gaussian_delta",
    "release_metrics",
]


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
