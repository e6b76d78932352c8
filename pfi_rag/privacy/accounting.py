"""Privacy accounting arithmetic: sample rates, epsilon of a spend history, noise for a spend.

A history is Opacus's accountant history, a list of ``(noise_multiplier, sample_rate, steps)``.
Epsilon is always computed by an Opacus accountant (``rdp`` by default) over the *whole*
history, so spends compose as the mechanism does, not as a sum of per-call epsilons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants import create_accountant

History = list[tuple[float, float, int]]
# Noise multipliers searched when a spend is given as epsilon; beyond this, refuse.
MAX_NOISE_MULTIPLIER = 1e4


def sample_rate(records: int, batch_size: int) -> float:
    """The Poisson rate Opacus accounts for a loader of ``records`` in batches of ``batch_size``.

    Opacus samples at q = 1/len(loader) but accounts at 1/len(DPDataLoader), whose length is
    ``int(1/q)``; float rounding makes that len(loader) - 1 for some lengths (93, 99, ...), a
    slightly larger, conservative rate. Mirrored here so a planned spend equals the recorded one.
    """
    if records < 1:
        raise ValueError("no records to train on")
    batches = math.ceil(records / batch_size)
    return 1 / int(1 / (1 / batches))


def epsilon_of(history: Sequence[tuple[float, float, int]], *, delta: float, mechanism: str) -> float:
    """Epsilon of the composed history at ``delta``; 0 for no steps, inf if any step had no noise."""
    history = [tuple(entry) for entry in history if entry[2] > 0]
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def noise_for_spend(
    history: Sequence[tuple[float, float, int]],
    *,
    epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    mechanism: str,
    tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (within ``tolerance`` in epsilon) whose ``steps`` raise the
    composed epsilon of ``history`` by at most ``epsilon``.

    Solving against the history, rather than for this call alone, makes ``epsilon`` exactly what
    the call takes from the budget; later calls of the same spend may use a little less noise,
    because composition grows sub-additively.
    """
    history = list(history)
    target = epsilon_of(history, delta=delta, mechanism=mechanism) + epsilon

    def total(sigma: float) -> float:
        return epsilon_of([*history, (sigma, sample_rate, steps)], delta=delta, mechanism=mechanism)

    low, high = 0.0, 1.0
    while total(high) > target:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"an epsilon spend of {epsilon:g} over {steps} steps needs too much noise")
    # Invariant: total(high) <= target < total(low) (total(0) is inf).
    while total(high) < target - tolerance and high - low > 1e-4:
        middle = (low + high) / 2
        if total(middle) > target:
            low = middle
        else:
            high = middle
    return high
