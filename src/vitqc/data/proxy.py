"""Synthetic defects on the user's own good validation images: a proxy validation set.

A quality engineer rarely has labelled defects to validate with, and the test split is
only ever scored. So vitqc builds a second validation set from the good *validation*
images: each gets one synthetic defect with an exact mask, at the model's input size
(the defect is painted after the resize, so the mask is exact in the pixels the model
sees). Kinds, in turn:

- the painters of ``vitqc synth`` (scratch, hole, stain, crack), drawn into a square
  window of the image;
- ``cutpaste``: a patch of *another* good validation image pasted at a new place (an
  anomaly made of normal material, the hardest kind for a local density); its mask is
  the whole patch, pixels that happen to match pushed by ``MIN_DELTA`` as the painters do;
- ``noise``: an elliptic blob of smoothed noise over the image.

Everything is seeded per image (``numpy.random.default_rng([seed, 17, i])``); the test
split is never read. The proxy figures (image AUROC of the defective copies against the
untouched good images, pixel AUROC and AUPRO on the defective copies) rank training
epochs and model candidates; they are not test metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vitqc.data.io import WHITE_LEVEL, load_image
from vitqc.data.records import Sample
from vitqc.data.synth import add_defect, push_weak_pixels
from vitqc.data.transforms import resize_batch
from vitqc.errors import VitqcError

PROXY_KINDS = ("scratch", "cutpaste", "hole", "noise", "crack", "stain")


@dataclass
class ProxySet:
    """Defective copies of the good validation images, at the model's input size."""

    samples: list[Sample]  # in-memory images (``array``), label 1
    masks: np.ndarray  # bool [N, H, W], exactly the changed pixels
    kinds: list[str]


def _to_uint8(images01) -> list[np.ndarray]:
    arr = (images01.permute(0, 2, 3, 1).numpy() * 255.0).round().clip(0, 255)
    return list(arr.astype(np.uint8))


def _square_window(shape: tuple[int, int], rng: np.random.Generator) -> tuple[slice, slice]:
    h, w = shape
    side = min(h, w)
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return slice(top, top + side), slice(left, left + side)


def _painted(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = _square_window(image.shape[:2], rng)
    out, mask = image.copy(), np.zeros(image.shape[:2], dtype=bool)
    out[rows, cols], mask[rows, cols] = add_defect(image[rows, cols], kind, rng)
    return out, mask


def _cutpaste(
    image: np.ndarray, donor: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    ph = max(4, int(rng.uniform(0.08, 0.2) * h))
    pw = max(4, int(rng.uniform(0.08, 0.2) * w))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = donor[sy : sy + ph, sx : sx + pw]
    if rng.random() < 0.5:
        patch = patch[::-1, ::-1]  # rotated half a turn: normal material, wrong place
    out = image.copy()
    out[ty : ty + ph, tx : tx + pw] = patch
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + ph, tx : tx + pw] = True
    return push_weak_pixels(out, image, mask), mask


def _noise(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    ry, rx = rng.uniform(0.04, 0.1) * h, rng.uniform(0.04, 0.1) * w
    cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
    yy, xx = np.mgrid[0:h, 0:w]
    angle = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = (dy * math.cos(angle) + dx * math.sin(angle)) / ry
    v = (-dy * math.sin(angle) + dx * math.cos(angle)) / rx
    mask = u**2 + v**2 <= 1.0
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.5)
    noise = noise / (noise.std() + 1e-8) * rng.uniform(40, 70)
    out = (image.astype(np.int16) + noise.astype(np.int16)[:, :, None]).clip(0, 255)
    return push_weak_pixels(out, image, mask), mask


def make_proxy_set(
    good: Sequence[Sample], size: tuple[int, int], seed: int = 0, white_level: int = WHITE_LEVEL
) -> ProxySet:
    """One synthetic defect on each good image (kinds in turn), at input ``size``."""
    good = list(good)
    if len(good) < 2:
        raise VitqcError(
            f"synthetic-defect validation needs at least 2 good validation images, got {len(good)}"
        )
    resized = _to_uint8(resize_batch([load_image(s, white_level) for s in good], size))
    samples, masks, kinds = [], [], []
    for i, image in enumerate(resized):
        rng = np.random.default_rng([seed, 17, i])
        kind = PROXY_KINDS[i % len(PROXY_KINDS)]
        for _attempt in range(5):
            if kind == "cutpaste":
                donor = resized[(i + 1 + int(rng.integers(len(resized) - 1))) % len(resized)]
                out, mask = _cutpaste(image, donor, rng)
            elif kind == "noise":
                out, mask = _noise(image, rng)
            else:
                out, mask = _painted(image, kind, rng)
            if mask.any():
                break
            kind = "noise"  # a painter's window missed the image: draw a noise blob
        samples.append(
            Sample(key=f"proxy/{kind}/{good[i].key}", label=1, defect_type=kind, array=out)
        )
        masks.append(mask)
        kinds.append(kind)
    return ProxySet(samples, np.stack(masks), kinds)


def proxy_figures(
    good_scores: np.ndarray,
    good_maps: np.ndarray,
    defect_scores: np.ndarray,
    defect_maps: np.ndarray,
    masks: np.ndarray,
) -> dict[str, float]:
    """Image AUROC (defective copies against the untouched good images), pixel AUROC and
    AUPRO (over both, at input size) and ``proxy``, their mean: higher is better."""
    from vitqc.metrics import aupro, image_auroc, pixel_auroc

    labels = np.r_[np.zeros(len(good_scores)), np.ones(len(defect_scores))]
    all_masks = list(np.zeros_like(np.asarray(good_maps), dtype=bool)) + list(masks)
    all_maps = list(good_maps) + list(defect_maps)
    figures = {
        "image_auroc": image_auroc(labels, np.r_[good_scores, defect_scores]),
        "pixel_auroc": pixel_auroc(all_masks, all_maps),
        "aupro": aupro(all_masks, all_maps),
    }
    figures["proxy"] = float(np.mean(list(figures.values())))
    return {k: float(v) for k, v in figures.items()}
