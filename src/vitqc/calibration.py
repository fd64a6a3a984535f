"""Decision threshold, its false-reject interval and map normalization, fixed before any
test image is seen.

The reference implementations pick thresholds on the test set and min-max normalize each
test batch, so their numbers depend on the test images. Here the threshold comes from
*normal scores*: the scores of good images under a model that did not see them (the
validation split, or out-of-fold scores of every good image, ``vitqc.folds``), and the
normalization from the validation maps; both are stored with the model
(``Calibration.to_dict()``); the test split is only used to report.

Uncertainty. A threshold's false-reject rate (FPR) on new good images is itself uncertain
when it rests on a few hundred good images. Every rule stores it as a Beta distribution
``fpr_beta = (a, b)``: for the target-FPR rule the threshold is the j-th smallest of n
exchangeable normal scores, whose exceedance probability is exactly ``Beta(n + 1 - j, j)``
whatever the score distribution; for a threshold chosen otherwise (F1 rules) with k of the
n normal scores above it, the uniform-prior posterior ``Beta(k + 1, n - k + 1)``. The
central 95 % of it is ``fpr_interval``; the count of flagged good images among m new ones
follows the matching beta-binomial (:meth:`Calibration.flagged_interval`), which is what a
test set of m good images should show.

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
from scipy import stats

from vitqc.errors import VitqcError

__all__ = [
    "DEFAULT_TARGET_FPR",
    "INTERVAL_LEVEL",
    "Calibration",
    "fit_calibration",
    "lowest_supported_fpr",
    "resolve_target",
    "paper_batch_minmax",
]

# Quality control usually accepts about 1 false reject per 100 good parts; it needs at
# least 99 normal scores (see lowest_supported_fpr).
DEFAULT_TARGET_FPR = 0.01
#: Coverage of the stated FPR intervals.
INTERVAL_LEVEL = 0.95
_VERSION = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Calibration:
    """Threshold, its FPR distribution and normalization values, fitted before testing.

    ``threshold`` is in raw image-score space (the image score of the raw map); flag
    ``score > threshold``. ``n_normal`` good-image scores from ``normal_source``
    ("out-of-fold" or "validation") carry the FPR: ``expected_fpr`` is the expected
    fraction of *new* good images above the threshold, ``fpr_interval`` its central
    ``INTERVAL_LEVEL`` range and ``fpr_beta`` the Beta distribution both come from.
    ``requested_target_fpr`` is set when the requested target needed more normal scores
    than there were and the lowest supported target was used instead. ``val_fpr`` is the
    fraction of good validation images above the threshold; ``val_f1``/``val_precision``/
    ``val_recall`` are filled for the F1 rules (on synthetic defects for "f1-synthetic").
    ``min_area`` (pixels of the original image, 0: off) is the per-region rule: an image
    is flagged only when its score is above the threshold *and* a connected region of
    its map above the threshold covers at least that area (``vitqc.decision``); it only
    ever removes flags, so the FPR stated for the threshold stays an upper bound.
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
    n_normal: int = 0
    normal_source: str = "validation"
    fpr_beta: tuple[float, float] | None = None
    fpr_interval: tuple[float, float] | None = None
    requested_target_fpr: float | None = None
    min_area: float = 0.0

    def flagged_interval(self, m: int, level: float = INTERVAL_LEVEL) -> tuple[int, int]:
        """The central ``level`` range of the number of good images flagged among ``m``
        new ones (beta-binomial from ``fpr_beta``): what a test set should show."""
        if self.fpr_beta is None:
            raise VitqcError("this calibration states no FPR distribution; refit the model")
        dist = stats.betabinom(int(m), *self.fpr_beta)
        return int(dist.ppf((1 - level) / 2)), int(dist.ppf((1 + level) / 2))

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
        values = {k: v for k, v in data.items() if k in names}
        for key in ("fpr_beta", "fpr_interval"):  # JSON lists back to tuples
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        try:
            cal = cls(**values)
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


def lowest_supported_fpr(n_normal: int) -> float:
    """The lowest target FPR ``n_normal`` normal scores support: ``1 / (n + 1)``, the
    expected FPR of their maximum. A lower target would need a threshold above every
    normal score, whose FPR the data cannot tell (e.g. 1 % needs 99 scores)."""
    return 1.0 / (int(n_normal) + 1)


def _target_rank(n: int, target_fpr: float) -> int:
    """1-based rank j of the order statistic with expected FPR ``(n + 1 - j) / (n + 1)``
    closest to but not above ``target_fpr`` (0: the target is not supported)."""
    m = math.floor((n + 1) * target_fpr + 1e-9)
    return n + 1 - m if m >= 1 else 0


def _fpr_threshold(normal: np.ndarray, target_fpr: float) -> tuple[float, tuple[float, float]]:
    """Conformal quantile: (threshold, Beta parameters of its FPR on new good images)."""
    n = normal.size
    j = _target_rank(n, target_fpr)
    return float(np.sort(normal)[j - 1]), (float(n + 1 - j), float(j))


def _fpr_beta_at(normal: np.ndarray, threshold: float) -> tuple[float, float]:
    """Posterior (uniform prior) of the FPR of a threshold chosen without the normal
    scores: ``Beta(k + 1, n - k + 1)`` with k of n normal scores above it."""
    k = int(np.sum(normal > threshold))
    return float(k + 1), float(normal.size - k + 1)


def resolve_target(target_fpr: float | None, n: int, source: str) -> tuple[float, float | None]:
    """(target to use, requested target when it had to be raised). An explicit target the
    data cannot support is an error that names the lowest supported one; the default
    target is raised to it with a warning (never a silent maximum)."""
    requested = DEFAULT_TARGET_FPR if target_fpr is None else float(target_fpr)
    if not 0.0 < requested < 1.0:
        raise VitqcError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if _target_rank(n, requested):
        return requested, None
    lowest = lowest_supported_fpr(n)
    message = (
        f"a target FPR of {requested:.2%} needs at least {math.ceil(1 / requested - 1)} "
        f"good images, got {n} {source} scores: the lowest target they support is "
        f"{lowest:.2%} (--target-fpr {math.ceil(lowest * 1e4) / 1e4:g})"
    )
    if target_fpr is not None:
        raise VitqcError(message + ", or add good images")
    warnings.warn(message + f"; using {lowest:.2%}", UserWarning, stacklevel=3)
    return lowest, requested


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
    target_fpr: float | None = None,
    labels: Any = None,
    normal_scores: Any = None,
    normal_source: str = "out-of-fold",
) -> Calibration:
    """Fix the image threshold, its FPR distribution and the map normalization.

    ``val_image_scores`` [N] raw image scores of the validation images; ``val_maps`` the
    matching raw maps (list of 2-D arrays or [N, h, w]) or None; ``labels`` [N] 0/1 when
    the validation set holds labelled defective images (real or synthetic; normalization
    uses the good ones only). ``normal_scores``: scores of good images under models that
    did not see them (``normal_source``, default out-of-fold); None: the good validation
    scores (``normal_source`` "validation").

    ``method="fpr"`` (default): with n normal scores the threshold is the j-th smallest,
    ``j = n + 1 - floor((n + 1) * target_fpr)``. Without any assumption on the score
    distribution, a new good image exceeds the j-th of n exchangeable scores with
    probability ``Beta(n + 1 - j, j)`` (mean ``(n + 1 - j) / (n + 1)``, the split-conformal
    quantile), so this is the lowest order statistic whose expected false-reject rate is at
    most ``target_fpr``. A target needs ``n >= 1 / target_fpr - 1`` scores: an explicit
    ``target_fpr`` beyond that is an error naming the lowest supported target; the default
    (``None``: 1 %) is raised to it with a warning and ``requested_target_fpr`` records
    the request. We add no invented margin and fit no tail model.

    ``method="f1"``: the threshold maximizing F1 on the labelled validation images, placed
    midway between the last unflagged and the first flagged distinct score; needs labels
    with both good and defective images (anomalib's F1 threshold silently flags every image
    when there are none; here that is an error). Its FPR is stated from the normal scores
    above it.
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
    if normal_scores is None:
        normal, normal_source = good, "validation"
    else:
        normal = _scores_1d(normal_scores, "normal scores")

    extra: dict[str, Any] = {}
    if method == "fpr":
        target, requested = resolve_target(target_fpr, normal.size, normal_source)
        threshold, beta = _fpr_threshold(normal, target)
        extra = {"target_fpr": target, "requested_target_fpr": requested}
    elif method == "f1":
        if labels is None or not y.any():
            raise VitqcError(
                "method 'f1' needs labelled defective validation images (labels with 1s); "
                "use method 'fpr' with good images only"
            )
        threshold = _f1_threshold(scores, y)
        beta = _fpr_beta_at(normal, threshold)
        from vitqc.metrics import f1_precision_recall

        f1, precision, recall = f1_precision_recall(y, scores, threshold)
        extra = {"target_fpr": None, "val_f1": f1, "val_precision": precision}
        extra["val_recall"] = recall
    else:
        raise VitqcError(f"unknown calibration method {method!r}; choose 'fpr' or 'f1'")

    dist = stats.beta(*beta)
    map_low, map_high = _normalization(good, val_maps, y)
    return Calibration(
        threshold=threshold,
        map_low=map_low,
        map_high=map_high,
        method=method,
        n_val_good=int(good.size),
        n_val_defective=int(y.sum()),
        val_fpr=float(np.mean(good > threshold)),
        expected_fpr=float(dist.mean()),
        n_normal=int(normal.size),
        normal_source=normal_source,
        fpr_beta=beta,
        fpr_interval=(
            float(dist.ppf((1 - INTERVAL_LEVEL) / 2)),
            float(dist.ppf((1 + INTERVAL_LEVEL) / 2)),
        ),
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
