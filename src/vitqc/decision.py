"""The decision on one image: its score against the threshold, optionally a minimum
defect size. NumPy and SciPy only (no torch), so that ``predict``, the exported model's
runtime and the service decide the same way.

Rule. An image is flagged when its score is above the threshold (strict). With a minimum
area (``min_area`` > 0, pixels of the original image) it is flagged only when, in
addition, a connected region of its anomaly map above the same threshold (8-connected)
covers at least ``min_area`` original pixels. The map is the model's map at its input
size; each map pixel stands for ``(H * W) / (h * w)`` pixels of an H x W original. The
area rule only removes flags, so the false-reject rate stated for the threshold stays an
upper bound.

Operator score (``operator_score``). One number an operator can read, the same in
``vitqc predict``, the exported ONNX graph and ``vitqc.runtime``: in [0, 1], exactly 0.5
at the threshold, monotone in the raw score. From the stored calibration: L = ``map_low``
(the median pixel score of the good validation maps: a typical normal pixel) and T = the
threshold (from the normal scores, see ``vitqc.calibration``); with u = (s - L) / (T - L),

    normalized = clip(u, 0, 1) / 2        for u <= 1  (linear from a typical normal pixel)
    normalized = 1 - 1 / (2 u)            for u > 1   (twice the threshold's margin: 0.75)

Applied to maps it gives the exported model's map, on the same scale. This is the one
definition: it works on floats, numpy arrays and (duck typing: ``-``, ``/``, ``.clip``)
torch tensors, which is how the export graph computes it. Display normalization
(``AnomalyModel.normalize``, figures) is a different, linear scale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from vitqc.errors import VitqcError

__all__ = ["decide", "largest_region_area", "operator_score", "parse_min_area", "pixel_area"]

_EIGHT = np.ones((3, 3), dtype=bool)


def operator_score(scores: Any, map_low: Any, threshold: Any) -> Any:
    """Raw scores (or maps) to the operator scale: 0.5 at ``threshold``, in [0, 1].

    ``scores`` may be a float, a numpy array or a torch tensor (then ``map_low`` and
    ``threshold`` may be 0-d tensors, as in the export graph, and a tensor comes back);
    floats and arrays come back as float64 numpy values. Needs ``threshold > map_low``."""
    if not hasattr(scores, "clip"):
        scores = np.asarray(scores, dtype=np.float64)
    span = threshold - map_low
    if isinstance(span, float | int | np.floating) and not span > 0:
        raise VitqcError(
            f"the operator score needs the threshold ({float(threshold):g}) above the "
            f"typical normal pixel score map_low ({float(map_low):g})"
        )
    u = (scores - map_low) / span
    # u <= 1: u.clip(0, 1) / 2 and the second term is 0; u > 1: 1/2 + 1/2 - 1 / (2u)
    return u.clip(0.0, 1.0) * 0.5 + (0.5 - 0.5 / u.clip(min=1.0))


def largest_region_area(anomaly_map: np.ndarray, threshold: float) -> int:
    """Map pixels in the largest 8-connected region with values above ``threshold``."""
    labelled, n = ndimage.label(np.asarray(anomaly_map) > threshold, structure=_EIGHT)
    return int(np.bincount(labelled.ravel())[1:].max()) if n else 0


def pixel_area(original_size: Sequence[int], map_size: Sequence[int]) -> float:
    """Original pixels per map pixel for an ``original_size`` (H, W) image."""
    return float(original_size[0] * original_size[1]) / float(map_size[0] * map_size[1])


def decide(
    scores: Sequence[float] | np.ndarray,
    maps: Sequence[np.ndarray] | np.ndarray | None,
    threshold: float,
    min_area: float = 0.0,
    original_sizes: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(flagged [N] bool, largest region in original pixels [N] or None)``.

    Without a minimum area the maps are not needed (None). ``original_sizes`` (H, W) per
    image convert map pixels to original pixels (None: the map's own pixels)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    flagged = scores > float(threshold)
    if not min_area or min_area <= 0:
        return flagged, None
    if maps is None or len(maps) != scores.size:
        raise VitqcError("the minimum-area rule needs one anomaly map per image")
    areas = np.zeros(scores.size)
    for i, anomaly_map in enumerate(maps):
        scale = 1.0
        if original_sizes is not None:
            scale = pixel_area(original_sizes[i], np.asarray(anomaly_map).shape[-2:])
        areas[i] = largest_region_area(anomaly_map, threshold) * scale
    return flagged & (areas >= float(min_area)), areas


def parse_min_area(text: str | float | None, mm_per_pixel: float | None = None) -> float:
    """``--min-area`` in original pixels: ``"50"`` (pixels) or ``"2.5mm2"`` (square
    millimetres, needs ``mm_per_pixel``); None or 0: off."""
    if text is None:
        return 0.0
    raw = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(px|mm2|mm\^2|mm²)?", raw)
    if not match:
        raise VitqcError(f"--min-area {text!r}: use pixels (e.g. 50) or mm2 (e.g. 2.5mm2)")
    value, unit = float(match.group(1)), match.group(2)
    if unit in (None, "px"):
        return value
    if mm_per_pixel is None or not mm_per_pixel > 0:
        raise VitqcError(f"--min-area {text}: an area in mm2 needs --mm-per-pixel (> 0)")
    return value / (float(mm_per_pixel) ** 2)
