"""Decision threshold and map normalization, fixed from the validation split only.

The reference implementations pick thresholds on the test set and min-max normalize each
test batch, so their numbers depend on the test images. Here everything is fixed before any
test image is seen, from the anomaly scores of the validation split, and stored with the
model (``Calibration.to_dict()``); the test split is only used to report.

Score space. The threshold applies to the *raw* image score, which is the maximum of the
raw anomaly map. An image is flagged when ``score > threshold`` (strict), the same rule as
:func:`vitqc.metrics.f1_precision_recall`. Normalization is for display and for comparing
models; it never changes a decision, and ``normalize_score(threshold)`` gives the threshold
in normalized units.

Map normalization (``normalized = (x - map_low) / (map_high - map_low)``, not clipped):

- ``map_low`` is the median of all pixel scores of the good validation maps: a typical
  normal pixel reads 0. A median over hundreds of thousands of pixels barely moves between
  runs, unlike the minimum (often a border artefact) used by plain min-max.
- ``map_high`` is the highest score on any good validation image (the maximum of the good
  validation image scores, which is the maximum of their maps): 1 means "as anomalous as the
  worst spot seen on a good part", so values above 1 are beyond anything seen on good
  parts. This is the reference level of min-max normalization as in anomalib, but measured
  on validation images only.
  Without validation maps, ``map_low`` falls back to the median good validation image score.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import numpy as np

from vitqc.errors import VitqcError

__all__ = ["DEFAULT_TARGET_FPR", "Calibration", "fit_calibration", "paper_batch_minmax"]

# Quality control usually accepts about 1 false reject per 100 good parts. With fewer than
# 99 good validation images this target is beyond the data and the threshold becomes the
# highest good validation score (see fit_calibration), i.e. "flag anything worse than every
# good part seen in validation".
DEFAULT_TARGET_FPR = 0.01
_VERSION = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Calibration:
    """Threshold and normalization values, all fitted on validation scores.

    ``threshold`` is in raw image-score space (max of the raw map); flag ``score >
    threshold``. ``val_fpr`` is the fraction of good validation images above the threshold;
    ``expected_fpr`` (method "fpr") is the distribution-free expected fraction of *new*
    good images above it (see :func:`fit_calibration`). ``val_f1``/``val_precision``/
    ``val_recall`` are filled for method "f1".
    """

    threshold: float
    map_low: float
    map_high: float
    method: str = "fpr"
    target_fpr: float | None = DEFAULT_TARGET_FPR
    n_val_good: int = 0
    n_val_defective: int = 0
    val_fpr: float = 0.0
    expected_fpr: float | None = None
    val_f1: float | None = None
    val_precision: float | None = None
    val_recall: float | None = None

    @property
    def scale(self) -> float:
        return self.map_high - self.map_low

    def normalize_map(self, x: T) -> T:
        """``(x - map_low) / (map_high - map_low)`` for numpy arrays, tensors or floats."""
        return (x - self.map_low) / self.scale  # type: ignore[operator,return-value]

    def normalize_score(self, x: T) -> T:
        """Image scores are maxima of raw maps, so they share the map normalization."""
        return self.normalize_map(x)

    @property
    def normalized_threshold(self) -> float:
        return float(self.normalize_score(self.threshold))

    def is_anomalous(self, image_scores: Any) -> np.ndarray:
        """Decisions for raw image scores: ``score > threshold``."""
        return np.asarray(image_scores) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, stored with the model."""
        return {"version": _VERSION, "score_space": "raw_image_score_max_of_map", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if not isinstance(data, dict):
            raise VitqcError("calibration must be a JSON object")
        if data.get("version", _VERSION) != _VERSION:
            raise VitqcError(f"unsupported calibration version {data.get('version')}")
        names = {f.name for f in fields(cls)}
        missing = {"threshold", "map_low", "map_high"} - data.keys()
        if missing:
            raise VitqcError(f"calibration is missing {', '.join(sorted(missing))}")
        try:
            cal = cls(**{k: v for k, v in data.items() if k in names})
            for key in ("threshold", "map_low", "map_high"):
                if not math.isfinite(float(getattr(cal, key))):
                    raise ValueError(key)
        except (TypeError, ValueError) as exc:
            raise VitqcError(f"invalid calibration values: {exc}") from exc
        if cal.scale <= 0:
            raise VitqcError("invalid calibration: map_high must be above map_low")
        return cal


def _scores_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise VitqcError(f"{name} is empty: calibration needs validation images")
    if not np.isfinite(arr).all():
        raise VitqcError(f"{name} contain NaN or infinite values")
    return arr


def _fpr_threshold(good: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """Conformal quantile: (threshold, expected FPR on new good images)."""
    n = good.size
    s = np.sort(good)
    m = math.floor((n + 1) * target_fpr + 1e-9)
    j = min(n, n + 1 - m)  # 1-based order statistic
    if m == 0 and 1 / (n + 1) > 2 * target_fpr:
        warnings.warn(
            f"target_fpr={target_fpr:g} needs at least {math.ceil(1 / target_fpr - 1)} good "
            f"validation images, got {n}: the threshold is the highest validation score, "
            f"which a new good image exceeds with probability about 1/{n + 1} = "
            f"{1 / (n + 1):.3f}",
            UserWarning,
            stacklevel=3,
        )
    return float(s[j - 1]), (n + 1 - j) / (n + 1)


def _f1_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """Threshold maximizing F1 for ``score > threshold``; midway between distinct scores."""
    u = np.unique(scores)  # ascending, distinct
    pos = np.sort(scores[y])
    n_pos = pos.size
    # Candidate i flags every score > u[i] (i = -1: flag all); flagging none has F1 = 0.
    tp = np.r_[n_pos, n_pos - np.searchsorted(pos, u[:-1], side="right")]
    flagged = np.r_[scores.size, scores.size - np.searchsorted(np.sort(scores), u[:-1], "right")]
    f1 = 2 * tp / (flagged + n_pos)
    # argmax takes the first maximum = the lowest threshold: on an F1 tie we prefer missing
    # fewer defects, the costlier error in inspection.
    best = int(np.argmax(f1)) - 1
    if best == -1:
        lo = u[0]
        gap = (u[1] - u[0]) / 2 if u.size > 1 else max(abs(lo), 1.0) * 1e-6
        return float(lo - gap)
    lo, hi = u[best], u[best + 1]
    t = (lo + hi) / 2
    return float(t if lo <= t < hi else lo)


def fit_calibration(
    val_image_scores: Any,
    val_maps: Any = None,
    *,
    method: str = "fpr",
    target_fpr: float = DEFAULT_TARGET_FPR,
    labels: Any = None,
) -> Calibration:
    """Fix the image threshold and the map normalization from validation scores only.

    ``val_image_scores`` [N] raw image scores (max of each raw map); ``val_maps`` the
    matching raw maps (list of 2-D arrays or [N, h, w]) or None; ``labels`` [N] 0/1 if the
    validation set contains labelled defective images (normalization then uses the good
    ones only).

    ``method="fpr"`` (default): the threshold is the j-th smallest of the n good validation
    scores with ``j = min(n, n + 1 - floor((n + 1) * target_fpr))``. Without any assumption
    on the score distribution, a new good image exceeds the j-th of n scores with
    probability ``(n + 1 - j) / (n + 1)`` (the split-conformal quantile), so this is the
    lowest order statistic whose expected false-reject rate is at most ``target_fpr``; it
    is stored as ``expected_fpr``. When ``n + 1 < 1 / target_fpr`` (e.g. 10 images at 1%),
    the target lies beyond the data: the threshold is the highest validation score (no good
    validation image is flagged) and ``expected_fpr`` is ``1 / (n + 1)``. A warning says
    so when that is more than twice the target (fewer than 49 good images at 1%); from 49
    images on the maximum quietly delivers at most 2%. We add no invented margin and fit no
    tail model: the honest remedy is more validation images, and the stored
    ``expected_fpr`` says what the threshold delivers.
    Default ``target_fpr`` = 0.01 (one false reject per 100 good parts).

    ``method="f1"``: the threshold maximizing F1 on the labelled validation images, placed
    midway between the last unflagged and the first flagged distinct score; needs labels
    with both good and defective images (anomalib's F1 threshold silently flags every image
    when there are none; here that is an error).
    """
    scores = _scores_1d(val_image_scores, "validation image scores")
    if labels is None:
        y = np.zeros(scores.size, dtype=bool)
    else:
        raw = np.asarray(labels).ravel()
        if raw.size != scores.size:
            raise VitqcError(
                f"labels and validation scores differ in length: {raw.size} vs {scores.size}"
            )
        if raw.size and ((raw != 0) & (raw != 1)).any():
            raise VitqcError("labels must contain only 0 (good) and 1 (defective)")
        y = raw != 0
    if val_maps is not None and len(val_maps) != scores.size:
        raise VitqcError(f"got {len(val_maps)} validation maps for {scores.size} validation scores")
    good = scores[~y]
    if good.size == 0:
        raise VitqcError("calibration needs good validation images; none were given")

    extra: dict[str, Any] = {}
    if method == "fpr":
        if not 0.0 < float(target_fpr) < 1.0:
            raise VitqcError(f"target_fpr must be in (0, 1), got {target_fpr}")
        threshold, expected = _fpr_threshold(good, float(target_fpr))
        extra = {"target_fpr": float(target_fpr), "expected_fpr": expected}
    elif method == "f1":
        if labels is None or not y.any():
            raise VitqcError(
                "method 'f1' needs labelled defective validation images (labels with 1s); "
                "use method 'fpr' with good images only"
            )
        threshold = _f1_threshold(scores, y)
        from vitqc.metrics import f1_precision_recall

        f1, precision, recall = f1_precision_recall(y, scores, threshold)
        extra = {"target_fpr": None, "val_f1": f1, "val_precision": precision}
        extra["val_recall"] = recall
    else:
        raise VitqcError(f"unknown calibration method {method!r}; choose 'fpr' or 'f1'")

    map_low, map_high = _normalization(good, val_maps, y)
    return Calibration(
        threshold=threshold,
        map_low=map_low,
        map_high=map_high,
        method=method,
        n_val_good=int(good.size),
        n_val_defective=int(y.sum()),
        val_fpr=float(np.mean(good > threshold)),
        **extra,
    )


def _normalization(good_scores: np.ndarray, val_maps: Any, y: np.ndarray) -> tuple[float, float]:
    high = float(good_scores.max())
    if val_maps is None:
        low = float(np.median(good_scores))
    else:
        good_maps = [m for m, bad in zip(val_maps, y, strict=True) if not bad]
        pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in good_maps])
        if not np.isfinite(pixels).all():
            raise VitqcError("validation maps contain NaN or infinite values")
        low = float(np.median(pixels))
    if not high > low:
        # Constant scores (a degenerate model): keep a unit scale rather than divide by 0.
        warnings.warn(
            "validation scores are constant; map normalization uses a unit scale",
            UserWarning,
            stacklevel=3,
        )
        high = low + 1.0
    return low, high


def paper_batch_minmax(scores: Any) -> np.ndarray:
    """``(s - min) / (max - min)`` over the given batch, as in the evaluation paper's code.

    Only for reproducing that paper's tables. It is batch-dependent: an image's normalized
    score changes with the other images in the batch, and a batch of one always scores 0.
    Never use it for decisions; use :class:`Calibration` instead. A constant batch gives 0s.
    """
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    return np.zeros_like(s) if hi == lo else (s - lo) / (hi - lo)
