"""Evaluation metrics for anomaly detection and localization.

Plain numpy in, float out, in the style of ``sklearn.metrics``. Every metric here is exact:
tied scores are collapsed into one curve point (so the order of tied samples never changes a
result) and areas use the trapezoid rule, which for ROC equals the Mann-Whitney statistic
with ties counted as one half.

Conventions shared by all functions:

- Labels and masks are 0/1 (or bool); 1 = defective. A defective image whose mask is empty
  counts as defective for image metrics and simply adds no region (all its pixels are normal).
- A metric that needs both classes returns ``nan`` and emits an ``UndefinedMetricWarning``
  when one class is missing (all-normal or all-defective input), instead of raising: an
  evaluation report then shows ``null`` for that number and keeps the others.
- Pixel metrics accept masks and maps as stacked arrays ``[N, H, W]`` or as lists of 2-D
  arrays of different sizes. Evaluation is at each mask's resolution: a map whose shape
  differs from its mask is resized to it with :func:`resize_map` (bilinear). A mask given as
  ``None`` (a defective image without ground truth) leaves that image out.
- Pixel metrics never build per-threshold loops or full ``roc_curve`` copies: they sort the
  normal-pixel scores once and use cumulative sums, so 100 maps of 900x900 take seconds and
  a few hundred MB.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage

from vitqc.errors import VitqcError

__all__ = [
    "UndefinedMetricWarning",
    "aupro",
    "decision_f1_precision_recall",
    "f1_precision_recall",
    "image_auroc",
    "image_prauc",
    "pixel_auroc",
    "pr_curve_points",
    "pro_curve",
    "resize_map",
    "roc_curve_points",
]

# 8-connectivity: pixels touching only at a corner belong to the same region (MVTec's PRO).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_CHUNK = 1 << 20


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. no defective samples); it returns nan."""


def _undefined(what: str) -> float:
    warnings.warn(f"{what}; returning nan", UndefinedMetricWarning, stacklevel=3)
    return float("nan")


# --------------------------------------------------------------------------- input checks


def _as_binary(labels: object, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise VitqcError(f"{name} must be 0/1 or bool, got dtype {arr.dtype}")
    if arr.size and ((arr != 0) & (arr != 1)).any():
        raise VitqcError(f"{name} must contain only 0 and 1")
    return arr != 0


def _as_scores(scores: object, name: str) -> np.ndarray:
    arr = np.asarray(scores)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise VitqcError(f"{name} must be numeric, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise VitqcError(f"{name} contain NaN or infinite values")
    return arr


def _image_inputs(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary(labels, "labels").ravel()
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise VitqcError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise VitqcError("no samples to evaluate")
    return y, s


def resize_map(anomaly_map: object, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D anomaly map to ``shape`` (H, W) bilinearly, half-pixel aligned.

    Used to bring a model-resolution map to its mask's original resolution, as MVTec's
    official evaluation does. Uses ``torch.nn.functional.interpolate`` with
    ``align_corners=False``; antialiasing is applied only when shrinking, so upsampling (the
    usual case) is plain bilinear. Keeps float64 input in float64, else returns float32.
    """
    arr = np.asarray(anomaly_map)
    if arr.ndim != 2:
        raise VitqcError(f"an anomaly map must be 2-D, got shape {arr.shape}")
    shape = (int(shape[0]), int(shape[1]))
    dtype = np.float64 if arr.dtype == np.float64 else np.float32
    if arr.shape == shape:
        return arr.astype(dtype, copy=False)
    if min(shape) < 1:
        raise VitqcError(f"cannot resize an anomaly map to {shape}")
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype))[None, None]
    shrink = shape[0] < arr.shape[0] or shape[1] < arr.shape[1]
    out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0].numpy()


def _pairs(masks: object, maps: object) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated (bool mask, float map) pairs at mask resolution; None masks are dropped."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = [masks]
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps = [maps]
    mask_list = list(masks)  # type: ignore[call-overload]
    map_list = list(maps)  # type: ignore[call-overload]
    if len(mask_list) != len(map_list):
        raise VitqcError(f"got {len(mask_list)} masks but {len(map_list)} anomaly maps")
    pairs = []
    for i, (mask, amap) in enumerate(zip(mask_list, map_list, strict=True)):
        if mask is None:
            continue
        m = _as_binary(mask, f"mask {i}")
        if m.ndim != 2:
            raise VitqcError(f"mask {i} must be 2-D, got shape {m.shape}")
        a = _as_scores(amap, f"anomaly map {i}")
        if a.ndim != 2:
            raise VitqcError(f"anomaly map {i} must be 2-D, got shape {a.shape}")
        if a.shape != m.shape:
            a = resize_map(a, m.shape)
        pairs.append((m, a))
    if not pairs:
        raise VitqcError("no masks to evaluate pixel metrics on")
    return pairs


def _split_pixels(
    pairs: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of defect pixels and of normal pixels, each in one preallocated array."""
    dtype = np.result_type(np.float32, *(a.dtype for _, a in pairs))
    n_pos = sum(int(m.sum()) for m, _ in pairs)
    n_all = sum(m.size for m, _ in pairs)
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(n_all - n_pos, dtype=dtype)
    ip = ineg = 0
    for m, a in pairs:
        k = int(m.sum())
        pos[ip : ip + k] = a[m]
        neg[ineg : ineg + m.size - k] = a[~m]
        ip += k
        ineg += m.size - k
    return pos, neg


# --------------------------------------------------------------------------- ROC / AUROC


def _auroc_pos_neg(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2, exactly; sorts both arrays in place.

    Equal to the trapezoid area under the ROC curve with ties collapsed. Integer counts are
    summed exactly; only the final division is floating point.
    """
    pos.sort()
    neg.sort()
    twice_u = 0
    for start in range(0, pos.size, _CHUNK):
        keys = pos[start : start + _CHUNK]
        below = np.searchsorted(neg, keys, side="left")
        below_or_equal = np.searchsorted(neg, keys, side="right")
        twice_u += int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return twice_u / (2 * pos.size * neg.size)


def image_auroc(labels: object, scores: object) -> float:
    """Area under the image-level ROC curve (exact, ties count one half).

    ``labels`` [N] 0/1 (1 = defective), ``scores`` [N] (higher = more anomalous). Returns nan
    with an ``UndefinedMetricWarning`` when all images are normal or all defective.
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        return _undefined("image AUROC needs both good and defective images")
    return _auroc_pos_neg(s[y].copy(), s[~y].copy())


def pixel_auroc(masks: object, maps: object) -> float:
    """Area under the pixel-level ROC curve over all pixels of all images.

    ``masks`` [N, H, W] 0/1 or a list of 2-D masks (None entries are skipped), ``maps`` the
    matching anomaly maps (resized to their mask when the shapes differ). Exact with ties
    counted one half; memory is one copy of the scores (no index arrays), so 10^8 pixels
    fit in a few hundred MB. Returns nan with a warning if no pixel or every pixel is defective.
    """
    pos, neg = _split_pixels(_pairs(masks, maps))
    if pos.size == 0 or neg.size == 0:
        return _undefined("pixel AUROC needs both normal and defect pixels")
    return _auroc_pos_neg(pos, neg)


def _curve_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold, thresholds descending."""
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, s_sorted[last_of_tie]


def roc_curve_points(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` with one point per distinct score.

    Thresholds are descending; a sample is positive when ``score >= threshold``. The first
    point is (0, 0) at threshold +inf. For plotting; unlike scikit-learn no point is dropped.
    A missing class gives a nan axis and an ``UndefinedMetricWarning``.
    """
    y, s = _image_inputs(labels, scores)
    tps, fps, thr = _curve_counts(y, s)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        _undefined("ROC curve needs both classes")
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(tps.size + 1, np.nan)
        fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(fps.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


# --------------------------------------------------------------------------- PR


def pr_curve_points(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(precision, recall, thresholds)``, one point per distinct score.

    Thresholds are descending (recall increasing); a sample is positive when
    ``score >= threshold``. The first point is (precision 1, recall 0) at threshold +inf,
    matching scikit-learn's convention (its arrays are in the reverse order).
    """
    y, s = _image_inputs(labels, scores)
    tps, fps, thr = _curve_counts(y, s)
    n_pos = int(y.sum())
    if n_pos == 0:
        _undefined("precision-recall curve needs defective samples")
        recall = np.full(tps.size, np.nan)
    else:
        recall = tps / n_pos
    precision = tps / (tps + fps)
    return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thr]


def image_prauc(labels: object, scores: object) -> float:
    """Area under the image-level precision-recall curve, computed as average precision.

    AP = sum over distinct thresholds of (R_k - R_{k-1}) * P_k: the step-wise area, not the
    trapezoid (which is optimistic for PR curves). Identical to
    ``sklearn.metrics.average_precision_score``. Returns nan with a warning when all images
    are normal or all defective (AP would be undefined or trivially 1).
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        return _undefined("image PR-AUC needs both good and defective images")
    precision, recall, _ = pr_curve_points(y, s)
    return float(np.sum(np.diff(recall) * precision[1:]))


def f1_precision_recall(
    labels: object, scores: object, threshold: float
) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` when images with ``score > threshold`` are flagged.

    The comparison is strict, the same rule as :class:`vitqc.calibration.Calibration`: a
    score equal to the threshold is not flagged. Precision with nothing flagged is 0 (with
    a warning); with no defective images recall and F1 are nan (with a warning).
    """
    y, s = _image_inputs(labels, scores)
    if not math.isfinite(float(threshold)):
        raise VitqcError(f"threshold must be finite, got {threshold}")
    return decision_f1_precision_recall(y, s > float(threshold))


def decision_f1_precision_recall(labels: object, flagged: object) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` of given decisions (``flagged`` [N] bool), with the
    conventions of :func:`f1_precision_recall`; for rules that are not a single image
    threshold (the minimum-area rule, ``vitqc.decision``)."""
    y = np.asarray(labels).ravel() != 0
    flagged = np.asarray(flagged, dtype=bool).ravel()
    if flagged.shape != y.shape:
        raise VitqcError(f"got {flagged.size} decisions for {y.size} labels")
    tp = int(np.sum(flagged & y))
    fp = int(np.sum(flagged & ~y))
    fn = int(np.sum(~flagged & y))
    if tp + fp == 0:
        warnings.warn(
            "no image is above the threshold; precision set to 0",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        precision = 0.0
    else:
        precision = tp / (tp + fp)
    if tp + fn == 0:
        recall = _undefined("recall needs defective images")
        return float("nan"), precision, recall
    recall = tp / (tp + fn)
    f1 = 2 * tp / (2 * tp + fp + fn)
    return f1, precision, recall


# --------------------------------------------------------------------------- PRO


class _ProData:
    """Sorted normal-pixel scores and sorted defect-pixel scores with region weights.

    Each defect pixel carries weight ``1 / (n_regions * region_size)``, so the PRO at a
    threshold t (the mean over regions of the fraction of the region with score >= t) is
    the sum of the weights of the defect pixels scoring >= t.
    """

    def __init__(self, masks: object, maps: object) -> None:
        pairs = _pairs(masks, maps)
        dtype = np.result_type(np.float32, *(a.dtype for _, a in pairs))
        n_pos = sum(int(m.sum()) for m, _ in pairs)
        n_all = sum(m.size for m, _ in pairs)
        pos = np.empty(n_pos, dtype=dtype)
        neg = np.empty(n_all - n_pos, dtype=dtype)
        inv_size = np.empty(n_pos, dtype=np.float64)  # 1 / size of the pixel's region
        self.n_regions = 0
        ip = ineg = 0
        for m, a in pairs:
            k = int(m.sum())
            neg[ineg : ineg + m.size - k] = a[~m]
            ineg += m.size - k
            if k == 0:
                continue
            lab, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
            region_of_pixel = lab[m]
            sizes = np.bincount(region_of_pixel, minlength=n + 1)
            pos[ip : ip + k] = a[m]
            inv_size[ip : ip + k] = 1.0 / sizes[region_of_pixel]
            ip += k
            self.n_regions += n
        weights = inv_size / max(self.n_regions, 1)
        order = np.argsort(pos, kind="stable")
        self.pos = pos[order]
        w = weights[order]
        del weights, inv_size
        # suffix[i] = sum of weights of pos[i:]: summed from the top, so small PRO values
        # at high thresholds carry no cancellation error.
        self.suffix = np.r_[np.cumsum(w[::-1])[::-1], 0.0]
        self.pos_w = w
        neg.sort()
        self.neg = neg

    def pro_ge(self, v: np.ndarray | float) -> np.ndarray:
        return self.suffix[np.searchsorted(self.pos, v, side="left")]

    def pro_gt(self, v: np.ndarray | float) -> np.ndarray:
        return self.suffix[np.searchsorted(self.pos, v, side="right")]

    def boundary(self, limit: float) -> tuple[float, int, int]:
        """The tied group of normal scores where the FPR crosses ``limit``.

        Returns (value, count above it, count at or above it), with
        count_above / n < limit <= count_at_or_above / n.
        """
        neg, n = self.neg, self.neg.size
        r = min(n, max(1, math.ceil(limit * n)))
        while True:
            v = neg[n - r]
            c_ge = n - int(np.searchsorted(neg, v, side="left"))
            c_gt = n - int(np.searchsorted(neg, v, side="right"))
            if c_gt > 0 and c_gt / n >= limit:  # float rounding put us one group too low
                r = c_gt
            elif c_ge / n < limit and c_ge < n:  # ... or one group too high
                r = c_ge + 1
            else:
                return v, c_gt, c_ge


def _check_limit(fpr_limit: float) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise VitqcError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return limit


def _pro_data_or_none(masks: object, maps: object) -> _ProData | None:
    data = _ProData(masks, maps)
    if data.n_regions == 0:
        _undefined("PRO needs at least one defect region (all masks are empty)")
        return None
    if data.neg.size == 0:
        _undefined("PRO needs normal pixels to measure the false-positive rate")
        return None
    return data


def aupro(masks: object, maps: object, fpr_limit: float = 0.3) -> float:
    """Normalized area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected components of each ground-truth mask (blobs touching only
    diagonally are one region). At each threshold t the FPR is the fraction of all normal
    pixels of all images (normal images included) scoring >= t, and PRO is the mean over
    all regions of the dataset of the fraction of the region scoring >= t. The curve is
    exact: one point per distinct score (ties collapsed, so a tie between normal and defect
    pixels is a straight diagonal segment), starting at (0, 0), cut at ``fpr_limit`` by
    linear interpolation. The area is divided by ``fpr_limit``, so a perfect map scores 1.

    Cost: one sort of the normal-pixel scores and one of the defect-pixel scores, then a
    binary search per defect pixel; no per-threshold loop. Returns nan with an
    ``UndefinedMetricWarning`` if there is no defect region or no normal pixel.
    """
    limit = _check_limit(fpr_limit)
    d = _pro_data_or_none(masks, maps)
    if d is None:
        return float("nan")
    n = d.neg.size
    v_star, c_gt, c_ge = d.boundary(limit)
    start = n - c_gt  # d.neg[start:] are the normal scores strictly above v_star
    # Every tied group of normal scores at value v adds the trapezoid
    # count(v) / n * (PRO(> v) + PRO(>= v)) / 2. Summed per normal pixel and swapped to a
    # sum over defect pixels q: sum_q w_q * (#{normal v > v*: v <= q} + #{...: v < q}) / 2n.
    area = 0.0
    for i in range(0, d.pos.size, _CHUNK):
        q = d.pos[i : i + _CHUNK]
        le = np.maximum(np.searchsorted(d.neg, q, side="right") - start, 0)
        lt = np.maximum(np.searchsorted(d.neg, q, side="left") - start, 0)
        area += float(np.dot(d.pos_w[i : i + _CHUNK], (le + lt).astype(np.float64)))
    area /= 2 * n
    # The boundary group: a straight segment from (f0, PRO(> v*)) to (f1, PRO(>= v*)),
    # interpolated at the limit.
    f0, f1 = c_gt / n, c_ge / n
    p0, p1 = float(d.pro_gt(v_star)), float(d.pro_ge(v_star))
    p_lim = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
    area += (limit - f0) * (p0 + p_lim) / 2
    return min(max(area / limit, 0.0), 1.0)


def pro_curve(
    masks: object, maps: object, fpr_limit: float | None = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve ``(fpr, pro)`` up to ``fpr_limit`` (None: the whole curve).

    Same definition as :func:`aupro`; ``np.trapezoid(pro, fpr) / fpr_limit == aupro``.
    Points are the corners of the polyline through one point per distinct score; points on
    a vertical segment (thresholds crossed only by defect pixels) are merged into its ends.
    The last point is interpolated at ``fpr_limit``. Returns empty arrays (with a warning)
    when the curve is undefined.
    """
    limit = 1.0 if fpr_limit is None else _check_limit(fpr_limit)
    d = _pro_data_or_none(masks, maps)
    if d is None:
        return np.zeros(0), np.zeros(0)
    n = d.neg.size
    v_star, c_gt, _ = d.boundary(limit)
    top = d.neg[n - c_gt :]
    # Distinct normal scores from v_star upwards, descending, with cumulative counts.
    distinct_top = top[np.r_[np.flatnonzero(np.diff(top)), top.size - 1]] if top.size else top
    values = np.r_[v_star, distinct_top][::-1]
    c_at_or_above = n - np.searchsorted(d.neg, values, side="left")
    f_after = c_at_or_above / n
    f_before = np.r_[0.0, f_after[:-1]]
    p_before = d.pro_gt(values)
    p_after = d.pro_ge(values)
    # Interpolate the last segment at the limit.
    last_f0, last_f1 = f_before[-1], f_after[-1]
    p_after = p_after.copy()
    p_after[-1] = p_before[-1] + (p_after[-1] - p_before[-1]) * (limit - last_f0) / (
        last_f1 - last_f0
    )
    f_after = f_after.copy()
    f_after[-1] = limit
    fpr = np.empty(2 * values.size + 1)
    pro = np.empty(2 * values.size + 1)
    fpr[0] = pro[0] = 0.0
    fpr[1::2], fpr[2::2] = f_before, f_after
    pro[1::2], pro[2::2] = p_before, p_after
    if fpr_limit is None and pro[-1] < d.suffix[0]:
        # Defect pixels below every normal score: a final vertical rise at FPR 1.
        fpr, pro = np.r_[fpr, 1.0], np.r_[pro, d.suffix[0]]
    keep = np.r_[True, (np.diff(fpr) != 0) | (np.diff(pro) != 0)]
    return fpr[keep], pro[keep]
