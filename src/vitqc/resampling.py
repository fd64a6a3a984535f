"""Bilinear resizing and Gaussian blurring of maps as matrix products.

Both are linear and separable, so per axis they compose into one ``[size, n]`` matrix
and a resized map is ``A_h @ x @ A_w.T``: two small matrix products at any batch size
(a single-channel blur convolution over large maps is slow on CPU; for the resize alone
they cost about what ``F.interpolate`` does), and constants of an exported graph.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def resample(x: torch.Tensor, size: tuple[int, int], sigma: float = 0.0) -> torch.Tensor:
    """``x [..., h, w]`` -> ``[..., H, W]``: bilinear resizing (``align_corners=False``,
    ``F.interpolate``'s, without antialiasing), then a Gaussian blur of ``sigma`` px
    (radius ``ceil(4 sigma)``, edges replicated; ``sigma <= 0``: none)."""
    # plain ints: a traced export sees shapes as tensors, and the grid is fixed per model
    (h, w), (out_h, out_w) = (int(v) for v in x.shape[-2:]), size
    if (h, w) == (int(out_h), int(out_w)) and sigma <= 0:
        return x
    rows = _resampling_matrix(h, int(out_h), float(sigma)).to(x)
    cols = _resampling_matrix(w, int(out_w), float(sigma)).to(x)
    return rows @ x @ cols.T


@functools.lru_cache(maxsize=32)
def _resampling_matrix(n: int, size: int, sigma: float) -> torch.Tensor:
    """``[size, n]``: linear upsampling (``align_corners=False``) followed by the blur,
    along one axis. Built in NumPy, so that an ONNX export records a constant, not the
    steps; outside inference mode, as it is cached and reused anywhere."""
    matrix = _linear_upsampling(n, size)
    if sigma > 0:
        matrix = _blur(size, sigma) @ matrix
    with torch.inference_mode(False):
        return torch.from_numpy(matrix.astype(np.float32))


def _linear_upsampling(n: int, size: int) -> np.ndarray:
    """``[size, n]``: ``F.interpolate(mode="linear", align_corners=False)`` as a matrix
    (upsampling or, without antialiasing, downsampling)."""
    if n == size:
        return np.eye(n)
    rows = np.arange(size)
    source = np.maximum((rows + 0.5) * (n / size) - 0.5, 0.0)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n - 1)
    matrix = np.zeros((size, n))
    np.add.at(matrix, (rows, low), 1.0 - (source - low))
    np.add.at(matrix, (rows, high), source - low)
    return matrix


def _blur(n: int, sigma: float) -> np.ndarray:
    """``[n, n]``: a 1-D Gaussian blur (radius ``ceil(4 sigma)``, edges replicated)."""
    radius = max(1, math.ceil(4 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    rows = np.arange(n)
    matrix = np.zeros((n, n))
    for offset, weight in zip(offsets, kernel / kernel.sum(), strict=True):
        np.add.at(matrix, (rows, np.clip(rows + offset, 0, n - 1)), weight)
    return matrix
