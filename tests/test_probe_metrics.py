"""Pure metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from pfi_rag.probes.metrics import (
    brier,
    cusum_lower,
    ece,
    exposure_from_rank,
    exposure_from_samples,
    gini,
    robust_z,
    roc_auc,
    support,
    tpr_at_fpr,
)
from pfi_rag.probes.release import analytic_gaussian_sigma, gaussian_delta


def test_ece_and_brier_by_hand():
    # Bin (0.8, 0.9]: confidences 0.9, 0.9, accuracy 1/2 -> |0.5 - 0.9| x 2/4 = 0.2.
    # Bin (0.5, 0.6]: confidences 0.6, 0.6, accuracy 1   -> |1 - 0.6| x 2/4 = 0.2.
    assert ece([0.9, 0.9, 0.6, 0.6], [True, False, True, True]) == pytest.approx(0.4)
    assert ece([0.7, 0.7], [True, False]) == pytest.approx(0.2)
    # Rows: (0.9-1)^2 + 0.1^2 = 0.02 ; 0.5^2 + (0.5-1)^2 = 0.5 -> mean 0.26.
    assert brier(np.array([[0.9, 0.1], [0.5, 0.5]]), [0, 1]) == pytest.approx(0.26)


def test_gini_by_hand():
    assert gini([1, 1, 1]) == 0.0
    # [0, 0, 3]: mean |xi - xj| over 9 ordered pairs = 12/9, mean 1 -> 12/9/2 = 2/3.
    assert gini([0, 0, 3]) == pytest.approx(2 / 3)


def test_exposure_from_rank_and_samples():
    assert exposure_from_rank(1, 1024) == 10.0
    assert exposure_from_rank(1024, 1024) == 0.0
    # 2 of 8 samples beat the secret: share 1/4, rank 1 + (|R|-1)/4.
    estimate = exposure_from_samples(5.0, [1, 2, 6, 7, 8, 9, 10, 11], 10**6)
    assert estimate["estimated_rank"] == pytest.approx(1 + (10**6 - 1) / 4)
    assert estimate["exposure"] == pytest.approx(math.log2(10**6) - math.log2(1 + (10**6 - 1) / 4))
    # Nothing beats it: the normal tail extrapolates beyond log2(samples).
    far = exposure_from_samples(0.0, [50, 51, 49, 50, 52, 48], 10**6)
    assert far["samples_more_likely"] == 0 and far["exposure"] > math.log2(6)


def test_auc_and_tpr_at_fpr_by_hand():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [1, 2]) == 0.5  # ties count half: (0.5 + 0 + 1 + 0.5) / 4
    nonmembers = list(range(100))  # 1% FPR: the threshold is the 2nd highest non-member, 98
    assert tpr_at_fpr([99.5, 98.5, 50], nonmembers, 0.01) == pytest.approx(2 / 3)


def test_cusum_and_robust_z():
    # reference 1, slack 0.1: drops 0.2, 0.2, 0 -> 0.1, 0.2, 0.1.
    assert cusum_lower([0.8, 0.8, 1.0], reference=1.0, slack=0.1) == pytest.approx([0.1, 0.2, 0.1])
    z = robust_z([1, 2, 3, 100])  # median 2.5, MAD 1 -> 1.4826
    assert z[3] == pytest.approx((100 - 2.5) / 1.4826)
    assert list(robust_z([1, 1, 1, 5])) == [0, 0, 0, math.inf]


def test_support_counts_content_words():
    assert support("Your dog is called Biscuit.", "My dog Biscuit chewed a leash") == pytest.approx(2 / 3)
    assert support("Yes, it is.", "anything") is None


def test_analytic_gaussian_is_tight_and_beats_the_classic_bound():
    sigma = analytic_gaussian_sigma(0.5, 1e-5, 1.0)
    assert gaussian_delta(sigma, 0.5, 1.0) == pytest.approx(1e-5, rel=1e-3)
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert sigma < classic


def test_robust_z_floor_keeps_near_equal_values_unremarkable():
    from pfi_rag.probes.metrics import robust_z

    norms = [2.653, 2.6531, 2.6529, 2.653, 2.6505]
    assert abs(robust_z(norms)).max() > 3  # without a floor, 0.1% reads as an outlier
    assert abs(robust_z(norms, relative_floor=0.05)).max() < 0.1
    # A 10x scaled (poisoned) update still stands far out.
    assert robust_z([*norms, 26.5], relative_floor=0.05)[-1] > 100
