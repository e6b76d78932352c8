"""The one-run privacy audit: an empirical lower bound on the epsilon a training run achieved.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023). Of
m canaries, each is included in training independently with probability 1/2. After the one
run the auditor scores every canary (here: how much the adapter lowers its loss below the base
model's), guesses that the k+ highest scores are members and the k- lowest are not, and
abstains on the rest: r = k+ + k- guesses, v of them correct.

If training is (eps, delta)-DP with respect to each canary, the paper's main theorem bounds
how often that many guesses can be right. With B ~ Binomial(r, q), q = e^eps / (1 + e^eps) the
accuracy of eps-randomised response,

    P[V >= v] <= P[B >= v] + 2 m delta * max_{i = 1..v} P[v - i <= B < v] / i.

The right-hand side is the p-value of the observation under the hypothesis "the run was
(eps, delta)-DP". It grows with eps, and the audit reports the largest eps it still rejects at
confidence 1 - beta: with probability at least 1 - beta over the canaries' coin flips, the run
is not (eps, delta)-DP for any smaller eps. A correct DP implementation can never push that
bound past its accounted epsilon except with probability beta; a larger one is a DP bug.

The bound is loose (a black-box attack on a few canaries); it shows that privacy is at least
that weak, not that it is that strong. A non-private run with the same canaries shows the
audit's power: a clearly larger bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom

CONFIDENCE_BETA = 0.05  # the audit's error probability: a 95% lower bound
_EPS_CEILING = 100.0  # searched up to here; q is 1 - 4e-44 there, so any v <= r is reached


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] allowed by (epsilon, delta)-DP over m canaries (capped at 1)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # P[v - i <= B < v] for i = 1..v: pmf(v-1), pmf(v-1) + pmf(v-2), ...
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float((below / np.arange(1, v + 1)).max())
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float = CONFIDENCE_BETA) -> float:
    """The largest epsilon at which ``v`` correct guesses out of ``r`` have p-value below ``beta``.

    0 when even epsilon = 0 cannot be rejected (chance-level guessing). Bisection: the p-value
    increases with epsilon.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must lie in (0, 1), got {beta}")
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    low, high = 0.0, _EPS_CEILING
    if p_value(m=m, r=r, v=v, epsilon=high, delta=delta) < beta:
        return high
    for _ in range(60):  # to ~1e-16 of the ceiling
        middle = (low + high) / 2
        if p_value(m=m, r=r, v=v, epsilon=middle, delta=delta) < beta:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditResult:
    canaries: int  # m
    members: int  # canaries that were inserted (the auditor does not use this to guess)
    guesses: int  # r = k+ + k-
    correct: int  # v
    guessed_in: int  # k+
    guessed_out: int  # k-
    delta: float
    beta: float
    epsilon_lower_bound: float

    def as_dict(self) -> dict:
        return asdict(self)


def guess_counts(m: int, share: float) -> tuple[int, int]:
    """(k+, k-): guess ``share`` of the canaries in each direction, at least one each."""
    k = max(1, int(round(m * share)))
    return min(k, m // 2), min(k, m - min(k, m // 2))


def audit(
    scores: Sequence[float],
    inserted: Sequence[bool],
    *,
    guessed_in: int,
    guessed_out: int,
    delta: float,
    beta: float = CONFIDENCE_BETA,
) -> AuditResult:
    """Guess the ``guessed_in`` highest ``scores`` as members, the ``guessed_out`` lowest as not."""
    s = np.asarray(scores, dtype=float)
    truth = np.asarray(inserted, dtype=bool)
    m = s.size
    if truth.size != m or m == 0:
        raise ValueError("give one inclusion bit per canary score, and at least one canary")
    if guessed_in < 0 or guessed_out < 0 or guessed_in + guessed_out > m:
        raise ValueError(f"cannot guess {guessed_in} in and {guessed_out} out of {m} canaries")
    order = np.argsort(-s, kind="stable")  # highest score first; ties keep canary order
    top, bottom = order[:guessed_in], order[m - guessed_out :]
    correct = int(truth[top].sum() + (~truth[bottom]).sum())
    r = guessed_in + guessed_out
    return AuditResult(
        canaries=m,
        members=int(truth.sum()),
        guesses=r,
        correct=correct,
        guessed_in=guessed_in,
        guessed_out=guessed_out,
        delta=delta,
        beta=beta,
        epsilon_lower_bound=epsilon_lower_bound(m=m, r=r, v=correct, delta=delta, beta=beta),
    )
