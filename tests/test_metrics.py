"""Metrics against values worked out by hand, against scikit-learn, and against a brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from vitqc.errors import VitqcError
from vitqc.metrics import (
    UndefinedMetricWarning,
    aupro,
    f1_precision_recall,
    image_auroc,
    image_prauc,
    pixel_auroc,
    pr_curve_points,
    pro_curve,
    resize_map,
    roc_curve_points,
)


def brute_force_aupro(masks, maps, limit, connectivity=8):
    """The definition, literally: one loop iteration per distinct score (tiny inputs only)."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    normal = np.concatenate([a[~m] for m, a in zip(masks, maps, strict=True)])
    regions = []
    for m, a in zip(masks, maps, strict=True):
        lab, n = ndimage.label(m, structure=structure)
        regions += [a[lab == r] for r in range(1, n + 1)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    i = int(np.searchsorted(fpr, limit, side="left"))  # first point with fpr >= limit
    p_lim = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
    return np.trapezoid(np.r_[pro[:i], p_lim], np.r_[fpr[:i], limit]) / limit


# ----------------------------------------------------------------------------- image AUROC


def test_image_auroc_by_hand():
    # Pairs (defective, good): 0.35>0.1 yes, 0.35>0.4 no, 0.8>both yes -> 3 of 4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_ties_count_half():
    # Defective {0.5, 0.9} vs good {0.5, 0.2}: 0.5=0.5 -> 1/2, 0.5>0.2 -> 1, 0.9 -> 2.
    # (1/2 + 1 + 2) / 4 = 0.875, whatever the order of the tied samples.
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert image_auroc([1, 0, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert image_prauc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_roc_and_pr_curve_points_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    s = np.round(rng.random(100), 1)
    fpr, tpr, thr = roc_curve_points(y, s)
    sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert thr[0] == np.inf and np.all(np.diff(thr[1:]) < 0)
    precision, recall, _ = pr_curve_points(y, s)
    sk_p, sk_r, _ = precision_recall_curve(y, s)
    np.testing.assert_allclose(precision, sk_p[::-1])
    np.testing.assert_allclose(recall, sk_r[::-1])


# ----------------------------------------------------------------------------- PR-AUC


def test_image_prauc_by_hand():
    # Thresholds 0.8: P=1, R=1/2; 0.4: P=1/2, R=1/2; 0.35: P=2/3, R=1; 0.1: P=1/2, R=1.
    # AP = sum (R_k - R_{k-1}) P_k = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert image_prauc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)


def test_image_prauc_ties_collapse():
    # 0.9: P=1, R=1/2; the tie at 0.5 enters as one point: P=2/3, R=1. AP = 1/2 + 1/3.
    assert image_prauc([1, 0, 1], [0.9, 0.5, 0.5]) == pytest.approx(5 / 6)
    assert image_prauc([1, 1, 0], [0.9, 0.5, 0.5]) == pytest.approx(5 / 6)


# ----------------------------------------------------------------------------- F1


def test_f1_precision_recall_by_hand():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # > 0.3 flags 0.4 (good), 0.35, 0.8: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 = 4/5.
    f1, p, r = f1_precision_recall(y, s, 0.3)
    assert (f1, p, r) == pytest.approx((0.8, 2 / 3, 1.0))
    # The rule is strict: at 0.35 the 0.35 image is not flagged. TP 1, FP 1, FN 1.
    assert f1_precision_recall(y, s, 0.35) == pytest.approx((0.5, 0.5, 0.5))


def test_f1_nothing_flagged_and_no_defects():
    with pytest.warns(UndefinedMetricWarning):
        f1, p, r = f1_precision_recall([0, 1], [0.1, 0.2], 5.0)
    assert (f1, p, r) == (0.0, 0.0, 0.0)
    with pytest.warns(UndefinedMetricWarning):
        f1, p, r = f1_precision_recall([0, 0], [0.1, 0.9], 0.5)
    assert p == 0.0 and np.isnan(r) and np.isnan(f1)


# ----------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_by_hand():
    # Defect {0.8, 0.5} vs normal {0.5, 0.2}: 2 + (1/2 + 1) = 3.5 of 4 pairs.
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.8, 0.5, 0.5, 0.2]]])
    assert pixel_auroc(masks, maps) == pytest.approx(0.875)


def test_pixel_auroc_matches_sklearn_stacked_and_lists():
    rng = np.random.default_rng(1)
    masks = rng.random((6, 12, 10)) < 0.2
    maps = np.round(rng.random((6, 12, 10)) + 0.5 * masks, 2).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # Different sizes per image, given as lists.
    ml = [rng.random((h, w)) < 0.3 for h, w in [(5, 7), (9, 4), (3, 3)]]
    al = [rng.random(m.shape) + m for m in ml]
    y = np.concatenate([m.ravel() for m in ml])
    s = np.concatenate([a.ravel() for a in al])
    assert pixel_auroc(ml, al) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# ----------------------------------------------------------------------------- AUPRO


def test_aupro_diagonal_contact_is_one_region():
    # (0,1) and (1,2) touch only at a corner: 8-connectivity makes one 3-pixel region.
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.9, 0.0], [0.0, 0.5, 0.1], [0.0, 0.0, 0.0]])
    # 6 normal pixels: one at 0.5, five at 0.0. Curve: (0,0) -> t=0.9 (0, 2/3)
    # -> t=0.5 (1/6, 2/3) -> t=0.1 (1/6, 1) -> t=0 (1, 1).
    # Area to 0.3: 1/6 * 2/3 + (0.3 - 1/6) * 1 = 1/9 + 2/15 = 22/90; / 0.3 = 22/27.
    assert aupro([mask], [amap], 0.3) == pytest.approx(22 / 27)
    # With 4-connectivity it would be two regions (2 px found, 1 px missed): PRO 1/2 at
    # the top, area 1/12 + 2/15 = 13/60, /0.3 = 13/18. Make sure we are not computing that.
    assert brute_force_aupro([mask], [amap], 0.3, connectivity=4) == pytest.approx(13 / 18)
    assert brute_force_aupro([mask], [amap], 0.3) == pytest.approx(22 / 27)


def test_aupro_tie_between_normal_and_defect_is_a_diagonal():
    # One region {0.8, 0.5}; normal {0.5, 0.2}. t=0.8: (0, 1/2); t=0.5 crosses one normal
    # and one defect pixel at once: a straight segment to (1/2, 1). At FPR 0.3 the PRO is
    # 1/2 + 1/2 * 0.3/0.5 = 0.8; area 0.3 * (0.5 + 0.8)/2 = 0.195; / 0.3 = 0.65.
    # (Breaking the tie pessimistically would give 0.5, optimistically 1.0.)
    assert aupro([[[1, 1, 0, 0]]], [[[0.8, 0.5, 0.5, 0.2]]], 0.3) == pytest.approx(0.65)


def test_aupro_fpr_over_all_normal_pixels_including_normal_images():
    # The defective image above plus a normal image whose hottest pixel (0.9) beats the
    # defect. 6 normal pixels. t=0.9: (1/6, 0); t=0.8: (1/6, 1/2); t=0.5: (1/3, 1).
    # At 0.3: PRO = 1/2 + 1/2 * (0.3 - 1/6)/(1/6) = 0.9;
    # area = (0.3 - 1/6) * (0.5 + 0.9)/2 = 2/15 * 0.7 = 14/150; / 0.3 = 14/45.
    masks = [np.array([[1, 1, 0, 0]]), np.zeros((1, 4), dtype=bool)]
    maps = [np.array([[0.8, 0.5, 0.5, 0.2]]), np.array([[0.9, 0.0, 0.0, 0.0]])]
    assert aupro(masks, maps, 0.3) == pytest.approx(14 / 45)


def test_aupro_averages_over_regions_not_pixels():
    # Region A (1 px, found) and region B (3 px, missed) in different images: PRO = 1/2
    # for thresholds above every normal pixel (a pixel-weighted overlap would give 1/4).
    # Normal pixels all 0 and B's pixels 0 too: t=1: (0, 1/2); t=0: (1, 1).
    # The segment to (1, 1) is one tie: at 0.3, PRO = 0.5 + 0.5 * 0.3 = 0.65;
    # area = 0.3 * (0.5 + 0.65)/2; / 0.3 = 0.575.
    masks = [np.array([[1, 0], [0, 0]]), np.array([[1, 1, 1, 0]])]
    maps = [np.array([[1.0, 0], [0, 0]]), np.zeros((1, 4))]
    assert aupro(masks, maps, 0.3) == pytest.approx(0.575)


def test_empty_defective_mask_adds_no_region():
    # As the tie example, plus a defective image whose mask is empty: its 4 pixels are
    # normal (0.1) and add no region (otherwise a never-found region would halve PRO).
    # 6 normal pixels: t=0.8: (0, 1/2); t=0.5: (1/6, 1); area to 0.3:
    # 1/6 * (1/2 + 1)/2 + (0.3 - 1/6) * 1 = 1/8 + 2/15 = 31/120; / 0.3 = 31/36.
    masks = [np.array([[1, 1, 0, 0]]), np.zeros((1, 4), dtype=np.uint8)]
    maps = [np.array([[0.8, 0.5, 0.5, 0.2]]), np.full((1, 4), 0.1)]
    assert aupro(masks, maps, 0.3) == pytest.approx(31 / 36)
    # Pixel AUROC: 0.8 beats all 6 normal, 0.5 ties one and beats 5: (6 + 5.5) / 12.
    assert pixel_auroc(masks, maps) == pytest.approx(11.5 / 12)


def test_aupro_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) < 0.1
    assert aupro(masks, masks.astype(float), 0.3) == pytest.approx(1.0)
    assert aupro(masks, masks + rng.random(masks.shape) * 0.5, 0.3) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks, 0.3) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, limit):
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(3, 9, 2)) for _ in range(3)]
    masks = [rng.random(s) < 0.3 for s in shapes]
    masks[0][0, 0] = True  # at least one region
    masks[-1][-1, -1] = False  # at least one normal pixel
    if seed % 2:  # integer scores: lots of ties between and within classes
        maps = [rng.integers(0, 5, s).astype(float) for s in shapes]
    else:
        maps = [rng.random(s) for s in shapes]
    expected = brute_force_aupro(masks, maps, limit)
    assert aupro(masks, maps, limit) == pytest.approx(expected, abs=1e-12)
    fpr, pro = pro_curve(masks, maps, limit)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(limit)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert np.trapezoid(pro, fpr) / limit == pytest.approx(expected, abs=1e-12)


def test_pro_curve_whole_curve_ends_at_one_one():
    masks = [np.array([[1, 1, 0, 0]])]
    maps = [np.array([[0.8, -1.0, 0.5, 0.2]])]  # one defect pixel below every normal one
    fpr, pro = pro_curve(masks, maps, None)
    # (0,0) -> (0, 1/2) -> (1/2, 1/2) -> (1, 1/2) -> vertical rise to (1, 1).
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.5, 1])


def test_maps_of_other_resolution_are_resized_to_the_mask():
    rng = np.random.default_rng(5)
    masks = [rng.random((30, 20)) < 0.2, rng.random((18, 24)) < 0.2]
    small = [rng.random((8, 8)).astype(np.float32), rng.random((6, 6)).astype(np.float32)]
    big = [resize_map(a, m.shape) for a, m in zip(small, masks, strict=True)]
    assert big[0].shape == (30, 20) and big[1].shape == (18, 24)
    assert aupro(masks, small) == pytest.approx(aupro(masks, big))
    assert pixel_auroc(masks, small) == pytest.approx(pixel_auroc(masks, big))


def test_resize_map_is_half_pixel_bilinear():
    # align_corners=False: output pixel x samples input at (x + 0.5) / 2 - 0.5, clamped:
    # -0.25 -> 0, 0.25, 0.75, 1.25 -> 1.
    out = resize_map(np.array([[0.0, 1.0]], dtype=np.float32), (1, 4))
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]])
    assert resize_map(np.full((4, 4), 3.0), (9, 7)).dtype == np.float64
    np.testing.assert_allclose(resize_map(np.full((4, 4), 3.0), (9, 7)), 3.0)


def test_none_masks_are_skipped():
    masks = [np.array([[1, 1, 0, 0]]), None]
    maps = [np.array([[0.8, 0.5, 0.5, 0.2]]), np.full((5, 5), 99.0)]
    assert pixel_auroc(masks, maps) == pytest.approx(0.875)
    assert aupro(masks, maps, 0.3) == pytest.approx(0.65)


# ----------------------------------------------------------------------------- degenerate


def test_single_class_inputs_give_nan_with_warning():
    for fn in (image_auroc, image_prauc):
        with pytest.warns(UndefinedMetricWarning):
            assert np.isnan(fn([0, 0, 0], [0.1, 0.2, 0.3]))
        with pytest.warns(UndefinedMetricWarning):
            assert np.isnan(fn([1, 1], [0.1, 0.2]))
    empty = np.zeros((2, 4, 4), dtype=bool)
    full = np.ones((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random((2, 4, 4))
    for masks in (empty, full):
        with pytest.warns(UndefinedMetricWarning):
            assert np.isnan(pixel_auroc(masks, maps))
        with pytest.warns(UndefinedMetricWarning):
            assert np.isnan(aupro(masks, maps))


def test_bad_inputs_raise_vitqc_error():
    with pytest.raises(VitqcError, match="0 and 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(VitqcError, match="length"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(VitqcError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(VitqcError, match="NaN"):
        aupro([np.eye(3)], [np.full((3, 3), np.inf)])
    with pytest.raises(VitqcError, match="masks"):
        pixel_auroc([np.eye(3)], [np.eye(3), np.eye(3)])
    with pytest.raises(VitqcError, match="fpr_limit"):
        aupro([np.eye(3)], [np.eye(3)], fpr_limit=0.0)
    with pytest.raises(VitqcError, match="0 and 1"):
        aupro([np.eye(3) * 255], [np.eye(3)])
