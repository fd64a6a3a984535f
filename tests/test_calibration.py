"""Calibration: thresholds and normalization from validation scores only."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats

from vitqc.calibration import (
    DEFAULT_TARGET_FPR,
    Calibration,
    fit_calibration,
    lowest_supported_fpr,
    paper_batch_minmax,
)
from vitqc.data.records import Sample
from vitqc.errors import VitqcError
from vitqc.report.evaluation import evaluate_predictions


def test_default_target_fpr_is_one_percent():
    assert DEFAULT_TARGET_FPR == 0.01
    cal = fit_calibration(np.arange(1.0, 200.0))
    assert cal.method == "fpr" and cal.target_fpr == 0.01


def test_fpr_threshold_is_the_conformal_order_statistic():
    # n = 20 scores 1..20, target 10%: m = floor(21 * 0.1) = 2, j = 21 - 2 = 19 -> the
    # threshold is the 19th smallest score (19). Only 20 is above it: val FPR 1/20; a new
    # good image exceeds the 19th of 20 with probability 2/21 <= 10%.
    cal = fit_calibration(np.arange(1.0, 21.0), target_fpr=0.1)
    assert cal.threshold == 19.0
    assert cal.val_fpr == pytest.approx(1 / 20)
    assert cal.expected_fpr == pytest.approx(2 / 21)
    assert cal.n_val_good == 20 and cal.n_val_defective == 0


def test_fpr_threshold_at_one_percent_with_199_images():
    # m = floor(200 * 0.01) = 2: the second-highest score; one validation image flagged.
    scores = np.random.default_rng(0).permutation(np.arange(199.0))
    cal = fit_calibration(scores)
    assert cal.threshold == 197.0
    assert cal.val_fpr == pytest.approx(1 / 199)
    assert cal.expected_fpr == pytest.approx(0.01)


def test_an_explicit_target_beyond_the_data_is_refused_with_the_lowest_supported():
    scores = np.array([0.3, 0.1, 0.7, 0.2, 0.5, 0.4, 0.6, 0.15, 0.25, 0.35])
    # 10 scores support 1/11 = 9.09 % at best; 1 % needs 99.
    assert lowest_supported_fpr(10) == pytest.approx(1 / 11)
    with pytest.raises(VitqcError, match=r"needs at least 99 .*lowest target .* 9\.09%"):
        fit_calibration(scores, target_fpr=0.01)
    cal = fit_calibration(scores, target_fpr=0.0910)  # the offered target works
    assert cal.threshold == 0.7 and cal.expected_fpr == pytest.approx(1 / 11)


def test_the_default_target_is_raised_to_the_lowest_supported_and_says_so():
    scores = np.array([0.3, 0.1, 0.7, 0.2, 0.5, 0.4, 0.6, 0.15, 0.25, 0.35])
    with pytest.warns(UserWarning, match=r"lowest target they support is 9\.09%"):
        cal = fit_calibration(scores)
    assert cal.threshold == 0.7  # no good image flagged (strict >)
    assert cal.val_fpr == 0.0
    assert cal.target_fpr == pytest.approx(1 / 11)
    assert cal.requested_target_fpr == 0.01
    assert cal.expected_fpr == pytest.approx(1 / 11)
    # With 99 scores 1 % is exactly the maximum: supported, nothing to say.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal99 = fit_calibration(np.arange(99.0))
    assert cal99.threshold == 98.0 and cal99.expected_fpr == pytest.approx(0.01)
    assert cal99.requested_target_fpr is None


def test_f1_threshold_by_hand():
    # Sorted: 0.1 g, 0.2 g, 0.3 g, 0.35 d, 0.6 d, 0.7 d -> separable between 0.3 and 0.35:
    # the threshold is the midpoint 0.325, F1 = 1.
    scores = [0.1, 0.6, 0.2, 0.35, 0.3, 0.7]
    labels = [0, 1, 0, 1, 0, 1]
    cal = fit_calibration(scores, method="f1", labels=labels)
    assert cal.threshold == pytest.approx(0.325)
    assert cal.val_f1 == 1.0 and cal.val_precision == 1.0 and cal.val_recall == 1.0
    assert cal.n_val_good == 3 and cal.n_val_defective == 3 and cal.target_fpr is None


def test_f1_threshold_with_overlap_by_hand():
    # Sorted: 0.1 g, 0.2 d, 0.3 g, 0.4 d, 0.5 d. Flag > u_i for each distinct u_i:
    #   all 5: TP 3, FP 2 -> F1 = 6/8 = 0.75
    #   > 0.1: TP 3, FP 1 -> F1 = 6/7 = 0.857   <- best
    #   > 0.2: TP 2, FP 1 -> F1 = 4/6
    #   > 0.3: TP 2, FP 0 -> F1 = 4/5 = 0.8
    #   > 0.4: TP 1       -> F1 = 2/4
    # Best: flag > 0.1, threshold midway between 0.1 and 0.2.
    cal = fit_calibration([0.5, 0.3, 0.2, 0.1, 0.4], method="f1", labels=[1, 0, 1, 0, 1])
    assert cal.threshold == pytest.approx(0.15)
    assert cal.val_f1 == pytest.approx(6 / 7)
    assert cal.val_fpr == pytest.approx(0.5)  # 0.3 of the two good images is above


def test_f1_needs_labelled_defects():
    with pytest.raises(VitqcError, match="defective validation images"):
        fit_calibration([0.1, 0.2], method="f1")
    with pytest.raises(VitqcError, match="defective validation images"):
        fit_calibration([0.1, 0.2], method="f1", labels=[0, 0])
    with pytest.raises(VitqcError, match="good validation images"):
        fit_calibration([0.1, 0.2], method="f1", labels=[1, 1])


def test_invalid_inputs():
    with pytest.raises(VitqcError, match="empty"):
        fit_calibration([])
    with pytest.raises(VitqcError, match="NaN"):
        fit_calibration([0.1, np.nan])
    with pytest.raises(VitqcError, match="unknown calibration method"):
        fit_calibration([0.1, 0.2], method="youden")
    with pytest.raises(VitqcError, match="target_fpr"):
        fit_calibration([0.1, 0.2], target_fpr=1.5)
    with pytest.raises(VitqcError, match="length"):
        fit_calibration([0.1, 0.2], labels=[0])
    with pytest.raises(VitqcError, match="validation maps"):
        fit_calibration([0.1, 0.2], [np.zeros((2, 2))])


def test_map_normalization_uses_good_validation_maps_only():
    good1 = np.array([[0.0, 1.0], [2.0, 3.0]])
    good2 = np.array([[1.0, 1.0], [1.0, 5.0]])
    bad = np.full((2, 2), 100.0)
    scores = [3.0, 5.0, 100.0]
    cal = fit_calibration(scores, [good1, good2, bad], method="f1", labels=[0, 0, 1])
    # Good pixels 0,1,2,3,1,1,1,5 -> median 1; highest good image score 5.
    assert cal.map_low == 1.0 and cal.map_high == 5.0
    np.testing.assert_allclose(cal.normalize_map(good2), [[0, 0], [0, 1]])
    assert cal.normalize_score(5.0) == 1.0
    assert cal.normalized_threshold == pytest.approx((cal.threshold - 1.0) / 4.0)
    # Without maps the low end is the median image score.
    cal2 = fit_calibration([3.0, 5.0, 4.0], target_fpr=0.3)
    assert (cal2.map_low, cal2.map_high) == (4.0, 5.0)


def test_normalize_map_works_on_tensors():
    torch = pytest.importorskip("torch")
    cal = Calibration(threshold=2.0, map_low=1.0, map_high=3.0)
    out = cal.normalize_map(torch.tensor([1.0, 2.0, 5.0]))
    assert torch.allclose(out, torch.tensor([0.0, 0.5, 2.0]))
    np.testing.assert_array_equal(cal.is_anomalous([1.0, 2.0, 2.5]), [False, False, True])


def test_constant_validation_scores_keep_a_unit_scale():
    with pytest.warns(UserWarning, match="constant"):
        cal = fit_calibration(np.ones(200))
    assert cal.map_high - cal.map_low == 1.0


def test_dict_round_trip_through_json():
    cal = fit_calibration(
        np.arange(1.0, 21.0), [np.full((2, 2), v) for v in range(20)], target_fpr=0.1
    )
    data = json.loads(json.dumps(cal.to_dict()))
    assert data["score_space"] == "raw_image_score_max_of_map"
    assert Calibration.from_dict(data) == cal
    with pytest.raises(VitqcError, match="missing threshold"):
        Calibration.from_dict({"map_low": 0.0, "map_high": 1.0})
    with pytest.raises(VitqcError, match="map_high must be above"):
        Calibration.from_dict({"threshold": 1.0, "map_low": 1.0, "map_high": 1.0})
    with pytest.raises(VitqcError, match="invalid"):
        Calibration.from_dict({"threshold": "x", "map_low": 0.0, "map_high": 1.0})


def test_paper_batch_minmax_is_batch_dependent():
    np.testing.assert_allclose(paper_batch_minmax([2.0, 4.0, 6.0]), [0.0, 0.5, 1.0])
    # The same image (score 4) gets a different value in another batch ...
    assert paper_batch_minmax([4.0, 5.0])[0] == 0.0
    # ... and a batch of one always reads as perfectly normal.
    assert paper_batch_minmax([123.0])[0] == 0.0


def _test_split(rng, n_good, n_bad):
    samples = [
        Sample(key=f"g{i}", label=0, defect_type="good", array=np.zeros((8, 8), np.uint8))
        for i in range(n_good)
    ] + [
        Sample(key=f"d{i}", label=1, defect_type="crack", array=np.zeros((8, 8), np.uint8))
        for i in range(n_bad)
    ]
    scores = np.r_[rng.random(n_good), rng.random(n_bad) + 0.5]
    return samples, scores


def test_threshold_does_not_depend_on_the_test_split():
    rng = np.random.default_rng(0)
    val_scores = rng.random(60)
    val_maps = [rng.random((4, 4)) * s for s in val_scores]
    cal = fit_calibration(val_scores, val_maps, target_fpr=0.02)
    stored = cal.to_dict()

    # Two entirely different test splits (sizes, scores, defect rate).
    test_a = _test_split(rng, 10, 5)
    test_b = _test_split(rng, 40, 30)
    res_a = evaluate_predictions(*test_a, maps=None, threshold=cal.threshold)
    res_b = evaluate_predictions(*test_b, maps=None, threshold=cal.threshold)

    # The threshold used for reporting is the stored one, for both test sets ...
    assert res_a["threshold"] == res_b["threshold"] == stored["threshold"]
    # ... evaluation did not touch the calibration ...
    assert cal.to_dict() == stored
    # ... and refitting on the same validation data (whatever test set exists) is identical,
    # while the metrics themselves differ between the test sets.
    assert fit_calibration(val_scores, val_maps, target_fpr=0.02).to_dict() == stored
    assert res_a["n_test"] != res_b["n_test"]
    # The threshold is a validation order statistic: 60 images at 1% -> their maximum.
    assert stored["threshold"] == float(val_scores.max())


_DISTRIBUTIONS = {
    # the scores' shapes seen from heads: near-normal, log-normal NLLs, heavy tails
    "normal": stats.norm(),
    "lognormal": stats.lognorm(1.5),
    "pareto": stats.pareto(1.2),
}


@pytest.mark.parametrize(
    ("name", "n", "target"), [("normal", 400, 0.01), ("lognormal", 60, 0.05), ("pareto", 400, 0.01)]
)
def test_fpr_interval_covers_the_true_fpr_of_new_good_images(name, n, target):
    """The stated interval holds the true FPR (the exceedance probability of the
    threshold under the score distribution) in 95 % of draws, whatever the shape; the
    flagged count on m new good images lands in the predicted range at least as often."""
    dist, rng, reps, m = _DISTRIBUTIONS[name], np.random.default_rng(1), 400, 191
    inside = counted = 0
    for _ in range(reps):
        cal = fit_calibration(dist.rvs(n, random_state=rng), target_fpr=target)
        true_fpr = float(dist.sf(cal.threshold))
        inside += cal.fpr_interval[0] <= true_fpr <= cal.fpr_interval[1]
        lo, hi = cal.flagged_interval(m)
        flagged = int(np.sum(dist.rvs(m, random_state=rng) > cal.threshold))
        counted += lo <= flagged <= hi
        assert cal.expected_fpr <= target + 1e-12
    # binomial sd of a 95 % coverage over 400 draws: 0.011
    assert 0.92 <= inside / reps <= 0.98
    assert 0.93 <= counted / reps <= 1.0


def test_an_f1_threshold_states_its_fpr_from_the_normal_scores():
    rng = np.random.default_rng(2)
    good, bad = rng.normal(0, 1, 80), rng.normal(3, 1, 80)
    labels = np.r_[np.zeros(80), np.ones(80)]
    normal = rng.normal(0, 1, 500)  # out-of-fold scores of other good images
    cal = fit_calibration(np.r_[good, bad], method="f1", labels=labels, normal_scores=normal)
    k = int(np.sum(normal > cal.threshold))
    assert cal.n_normal == 500 and cal.normal_source == "out-of-fold"
    assert cal.fpr_beta == (k + 1, 500 - k + 1)
    assert cal.fpr_interval[0] < k / 500 < cal.fpr_interval[1]
    # coverage: the F1 threshold is fixed by the labelled images; fresh normal scores
    true_fpr, inside = float(stats.norm.sf(cal.threshold)), 0
    for _ in range(300):
        lo, hi = fit_calibration(
            np.r_[good, bad], method="f1", labels=labels, normal_scores=rng.normal(0, 1, 500)
        ).fpr_interval
        inside += lo <= true_fpr <= hi
    assert 0.9 <= inside / 300 <= 0.99


def test_normal_scores_carry_the_threshold_and_validation_the_normalization():
    val = np.arange(1.0, 11.0)  # 10 validation images: alone they cannot support 1 %
    normal = np.arange(0.0, 199.0)  # 199 out-of-fold scores: m = 2 -> the 2nd highest
    maps = [np.full((2, 2), v) for v in val]
    cal = fit_calibration(val, maps, normal_scores=normal)
    assert cal.threshold == 197.0 and cal.target_fpr == 0.01
    assert cal.n_normal == 199 and cal.normal_source == "out-of-fold"
    assert cal.fpr_beta == (2.0, 198.0) and cal.expected_fpr == pytest.approx(0.01)
    assert (cal.map_low, cal.map_high) == (5.5, 10.0)
    assert cal.n_val_good == 10 and cal.val_fpr == 0.0
