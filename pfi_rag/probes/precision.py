"""95% intervals of the sampled probe metrics, and sampling that stops at a stated precision.

A sampled probe (exposure ranks a secret among sampled candidates; the item probes score a
sample of evaluation items) reports its metric with an interval and draws more samples only
while the interval is wider than the precision the configuration asks for:

- a share k/n (an accuracy, a hit rate, a rank share): Clopper-Pearson (exact, never too narrow);
- a ratio of sums, sum d_i / sum t_i (a per-token NLL gain over items of t_i tokens): the
  ratio estimator's interval, var = sum (d_i - R t_i)^2 / (sum t_i)^2 * n / (n - 1);
- a mean of per-item values (a gap, a drop): the interval of the mean;
  both with Student's t quantile (n - 1 degrees of freedom): samples start small (8 prompts);
- a mean of values bounded in [0, 1] (a support score): the t interval, widened to at least the
  Wilson score interval of the mean, because such a variable's variance is at most m (1 - m):
  eight answers that all score 1.0 have no spread, but they do not pin the mean to exactly 1;
- anything else (ECE): a percentile bootstrap over items, seeded.

``sample_until`` grows a sample (doubling from ``first``) until the interval's half-width is at
most ``half_width``, the interval lies wholly on one side of the threshold (the verdict can no
longer change), or the pool runs out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import t as t_dist

from pfi_rag.probes.metrics import roc_auc

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # samples it rests on
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def clear_of(self, threshold: float | None) -> bool:
        """True when the whole interval is on one side of ``threshold`` (None: never)."""
        return threshold is not None and (self.low > threshold or self.high < threshold)

    def as_dict(self) -> dict:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "method": self.method,
        }


def t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t with n - 1 degrees of freedom (normal when large)."""
    return float(t_dist.ppf(0.975, n - 1)) if n > 1 else math.inf


def share_interval(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval of a binomial share k/n."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    low = 0.0 if k == 0 else float(beta_dist.ppf(0.025, k, n - k + 1))
    high = 1.0 if k == n else float(beta_dist.ppf(0.975, k + 1, n - k))
    return low, high


def proportion(k: int, n: int) -> Interval:
    low, high = share_interval(k, n)
    return Interval(k / n, low, high, n, "clopper-pearson")


def wilson(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share (k/n, or a [0, 1]-bounded mean) over n samples.

    Centre (p + z^2/2n) / (1 + z^2/n), half-width z / (1 + z^2/n) * sqrt(p (1 - p) / n + z^2 / 4n^2).
    """
    if n <= 0 or not 0.0 <= share <= 1.0:
        raise ValueError(f"need a share in [0, 1] and n > 0, got {share} over {n}")
    z2 = z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    # At 0 (1) the lower (upper) bound is exactly 0 (1); the formula only reaches it up to rounding.
    low = 0.0 if share == 0.0 else max(0.0, centre - half)
    high = 1.0 if share == 1.0 else min(1.0, centre + half)
    return low, high


def mean(values: Sequence[float]) -> Interval:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.inf
    q = t95(x.size)
    return Interval(m, m - q * se, m + q * se, int(x.size), "t mean")


def bounded_mean(values: Sequence[float]) -> Interval:
    """The mean of values in [0, 1]: Student's t interval clipped to [0, 1], widened to at least
    the Wilson interval of the mean (valid since the variance is at most m (1 - m))."""
    x = np.asarray(values, dtype=float)
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("bounded_mean needs values in [0, 1]")
    t = mean(x)
    low, high = wilson(t.estimate, t.n)
    return Interval(
        t.estimate, max(0.0, min(t.low, low)), min(1.0, max(t.high, high)), t.n, "t mean, at least Wilson"
    )


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Interval:
    """sum(numerators) / sum(denominators), with the ratio estimator's interval over the pairs."""
    d, t = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if d.size == 0 or d.size != t.size or t.sum() <= 0:
        raise ValueError("need as many positive-sum denominators as numerators")
    r = float(d.sum() / t.sum())
    n = d.size
    se = float(math.sqrt(((d - r * t) ** 2).sum() * n / (n - 1)) / t.sum()) if n > 1 else math.inf
    q = t95(n)
    return Interval(r, r - q * se, r + q * se, n, "ratio estimator, t")


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> Interval:
    """ROC AUC (P(member > non-member), ties half) with the Hanley-McNeil 95% interval."""
    a = np.asarray(member_scores, dtype=float)
    b = np.asarray(nonmember_scores, dtype=float)
    value = roc_auc(a, b)
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    variance = (value * (1 - value) + (a.size - 1) * (q1 - value**2) + (b.size - 1) * (q2 - value**2)) / (
        a.size * b.size
    )
    se = math.sqrt(max(variance, 0.0))
    low, high = max(0.0, value - Z95 * se), min(1.0, value + Z95 * se)
    return Interval(value, low, high, int(min(a.size, b.size)), "hanley-mcneil")


def bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, *, draws: int = 200, seed: int = 0
) -> Interval:
    """Percentile bootstrap of ``statistic(indices)`` over n items (indices drawn with replacement)."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(draws)]
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(float(statistic(np.arange(n))), float(low), float(high), n, f"bootstrap ({draws} draws)")


def sample_until(
    interval_of: Callable[[int], Interval],
    *,
    available: int,
    first: int,
    half_width: float,
    threshold: float | None = None,
) -> Interval:
    """The interval at the first sample size (first, 2 first, 4 first, ... capped at ``available``)
    where it is narrow enough or clear of ``threshold``; the interval of all ``available`` else."""
    if available < 1:
        raise ValueError("nothing to sample")
    n = min(max(first, 1), available)
    while True:
        interval = interval_of(n)
        if n >= available or interval.half_width <= half_width or interval.clear_of(threshold):
            return interval
        n = min(available, 2 * n)
