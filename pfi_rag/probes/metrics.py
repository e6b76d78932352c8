"""Pure numpy metrics the probes share; each is small enough to check by hand (see tests)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


def ece(confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of |accuracy - confidence| x share."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.size == 0:
        raise ValueError("ece of an empty set")
    # Bin i holds (i/bins, (i+1)/bins]; confidence 0 falls in the first bin.
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        member = index == b
        if member.any():
            total += member.mean() * abs(hit[member].mean() - conf[member].mean())
    return float(total)


def ece_equal_mass(confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10) -> float:
    """ECE over ``bins`` bins of (nearly) equal counts, by sorted confidence (HELM's estimator).

    Equal-width bins leave most bins empty when confidences crowd together (a small model's all
    sit near 1/K); equal-mass bins keep every bin's accuracy estimated from the same number of
    items. Fewer items than bins: one item per bin.
    """
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.size == 0:
        raise ValueError("ece of an empty set")
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for members in np.array_split(order, min(bins, conf.size)):
        total += members.size / conf.size * abs(hit[members].mean() - conf[members].mean())
    return float(total)


def calibration_curve(
    confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per non-empty bin, for reliability plots."""
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    return [
        (float(conf[index == b].mean()), float(hit[index == b].mean()), int((index == b).sum()))
        for b in range(bins)
        if (index == b).any()
    ]


def brier(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - 1[k = label])^2 (0 best, 2 worst)."""
    p = np.asarray(probabilities, dtype=float)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), np.asarray(labels)] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative values: mean absolute difference / (2 x mean); 0 = equal."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or np.any(x < 0):
        raise ValueError("gini needs a non-empty set of non-negative values")
    if x.sum() == 0:
        return 0.0
    diffs = np.abs(x[:, None] - x[None, :]).mean()
    return float(diffs / (2 * x.mean()))


def exposure_from_rank(rank: int, space_size: int) -> float:
    """Carlini et al. 2019: exposure = log2 |R| - log2 rank (rank 1 = the most likely candidate)."""
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank must lie in [1, {space_size}]")
    return math.log2(space_size) - math.log2(rank)


def exposure_from_samples(secret_nll: float, candidate_nlls: Sequence[float], space_size: int) -> dict:
    """Estimate exposure from candidates sampled uniformly from the secret's format space.

    The share of sampled candidates more likely than the secret estimates the share of the
    whole space ranked above it, so rank ~= 1 + share x (|R| - 1) (Carlini et al. 2019, §4.3).
    When no sample beats the secret, the share is below 1/m and the empirical estimate only
    bounds exposure; Carlini extrapolate from a fitted distribution of candidate scores, and
    so do we: a normal fit of the candidates' NLL gives the tail share at the secret's NLL.
    """
    nlls = np.asarray(candidate_nlls, dtype=float)
    m = nlls.size
    beaten_by = int((nlls < secret_nll).sum())
    if beaten_by > 0:
        share = beaten_by / m
        method = "sampled rank"
    else:
        mu, sd = float(nlls.mean()), float(nlls.std(ddof=1)) if m > 1 else 0.0
        z = (secret_nll - mu) / sd if sd > 0 else -np.inf
        share = 0.5 * math.erfc(-z / math.sqrt(2)) if np.isfinite(z) else 0.0
        share = min(share, 1.0 / m)  # never claim less exposure than the samples already show
        method = "normal tail (no sample more likely)"
    rank = 1.0 + share * (space_size - 1)
    return {
        "exposure": math.log2(space_size) - math.log2(rank),
        "estimated_rank": rank,
        "samples": m,
        "samples_more_likely": beaten_by,
        "method": method,
        "max_exposure": math.log2(space_size),
    }


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P(member score > non-member score), ties counting half (Mann-Whitney U / (n1 n2))."""
    a = np.asarray(member_scores, dtype=float)[:, None]
    b = np.asarray(nonmember_scores, dtype=float)[None, :]
    if a.size == 0 or b.size == 0:
        raise ValueError("roc_auc needs members and non-members")
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float) -> float:
    """Share of members flagged at the strictest threshold that flags at most ``fpr`` of non-members."""
    members = np.asarray(member_scores, dtype=float)
    others = np.sort(np.asarray(nonmember_scores, dtype=float))[::-1]
    allowed = math.floor(fpr * others.size)  # non-members we may flag
    # Flag scores strictly above the (allowed+1)-th highest non-member score.
    threshold = others[allowed] if allowed < others.size else -np.inf
    return float((members > threshold).mean())


def cusum_lower(series: Sequence[float], *, reference: float, slack: float) -> list[float]:
    """One-sided CUSUM for a downward drift: S_t = max(0, S_{t-1} + (reference - x_t) - slack)."""
    s, out = 0.0, []
    for x in series:
        s = max(0.0, s + (reference - float(x)) - slack)
        out.append(s)
    return out


def robust_z(values: Sequence[float], relative_floor: float = 0.0) -> np.ndarray:
    """(x - median) / (1.4826 x MAD); 0 where the spread is 0 and the value is the median.

    ``relative_floor`` keeps the scale at least that fraction of |median|: when every value is
    nearly the same (DP noise dominating equal-sized updates), a 0.1% difference would
    otherwise read as many standard deviations.
    """
    x = np.asarray(values, dtype=float)
    median = np.median(x)
    mad = max(1.4826 * np.median(np.abs(x - median)), relative_floor * abs(median))
    if mad == 0:  # more than half the values are equal: any other value is infinitely far out
        z = np.zeros_like(x)
        z[x > median], z[x < median] = np.inf, -np.inf
        return z
    return (x - median) / mad


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


STOPWORDS = frozenset(
    "a an and are as at be but by for from has have i in is it its my of on or our so that the "
    "their them they this to was were will with you your me we he she his her not no yes do does "
    "did can could would should what which who when where how".split()
)


def support(answer: str, context: str) -> float | None:
    """Share of the answer's content words found in the context; None when it has none."""
    content = [w for w in words(answer) if w not in STOPWORDS and len(w) > 1]
    if not content:
        return None
    found = set(words(context))
    return sum(w in found for w in content) / len(content)
