"""Image preprocessing shared by training and inference.

One resize function and one ``Preprocessor`` module are used everywhere, so the pixels a
backbone sees at inference are computed exactly like the ones it saw when the head was
fitted. The preprocessor's statistics are buffers, so they travel with a model's weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitqc.data.io import WHITE_LEVEL, load_image, white_level_for
from vitqc.data.records import Sample
from vitqc.errors import VitqcError

#: Smallest per-channel range used by min-max scaling: one gray level. A channel that is
#: (nearly) constant on the training split must not blow up test-time differences.
MIN_RANGE = 1.0 / 255.0


def _to_chw_float(image: np.ndarray) -> torch.Tensor:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise VitqcError(f"expected an HxWx3 or HxW image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise VitqcError(f"expected uint8 pixels, got {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def resize_tensor(x01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a float ``[B, 3, H, W]`` batch in [0, 1] with the same filter as ``resize_batch``.

    Bilinear with antialiasing: a triangle filter has non-negative weights, so the output
    stays in [0, 1] (the clamp only removes rounding error).
    """
    h, w = int(size[0]), int(size[1])
    if tuple(x01.shape[-2:]) == (h, w):
        return x01
    out = F.interpolate(x01, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def resize_batch(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Stack uint8 images (``HxWx3`` or ``HxW``; sizes may differ) as ``[B, 3, h, w]`` in [0, 1]."""
    if len(images) == 0:
        return torch.empty(0, 3, int(size[0]), int(size[1]))
    tensors = [_to_chw_float(img) for img in images]
    if all(t.shape == tensors[0].shape for t in tensors):
        return resize_tensor(torch.stack(tensors), size)
    return torch.cat([resize_tensor(t[None], size) for t in tensors])


def iter_resized_batches(
    samples: Sequence[Sample],
    size: tuple[int, int],
    batch_size: int = 32,
    white_level: int = WHITE_LEVEL,
) -> Iterator[torch.Tensor]:
    """Yield ``resize_batch`` tensors for the samples, ``batch_size`` images at a time
    (``white_level``: ``io.image_array``'s).

    Handy for ``Preprocessor.fit_minmax``: the training split is streamed, never held whole.
    """
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        yield resize_batch([load_image(s, white_level) for s in chunk], size)


def _vec3(values: Iterable[float] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.repeat(3)
    if t.numel() != 3:
        raise VitqcError(f"{what} needs 3 values (one per channel), got {t.numel()}")
    return t.clone()


class Preprocessor(nn.Module):
    """Per-channel min-max scaling (the paper's) followed by the backbone's mean/std.

    ``channel_min``/``channel_max`` come from the training split (``fit_minmax``); with
    ``minmax=False`` they stay 0 and 1 so only the mean/std normalization applies.
    All four statistics are buffers: saved with the model, moved with ``.to()``.
    """

    channel_min: torch.Tensor
    channel_max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        image_size: tuple[int, int],
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        minmax: bool = True,
        channel_min: Sequence[float] | torch.Tensor | None = None,
        channel_max: Sequence[float] | torch.Tensor | None = None,
        minmax_fitted: bool = False,
        bit_depth: int = 8,
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        #: bits per pixel of the images this model reads (``io.image_array``): 8, or a
        #: camera's 10 to 16 (grayscale files of more than 8 bits, ``--bit-depth``)
        self.bit_depth = int(bit_depth)
        white_level_for(self.bit_depth)  # refuses a depth out of range
        self.minmax = bool(minmax)
        self.minmax_fitted = bool(minmax_fitted) and self.minmax
        std_t = _vec3(std, "std")
        if bool((std_t <= 0).any()):
            raise VitqcError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", _vec3(mean, "mean"))
        self.register_buffer("std", std_t)
        cmin = _vec3(channel_min if channel_min is not None and minmax else 0.0, "channel_min")
        cmax = _vec3(channel_max if channel_max is not None and minmax else 1.0, "channel_max")
        self.register_buffer("channel_min", cmin)
        self.register_buffer("channel_max", cmax)

    @property
    def white_level(self) -> int:
        """The value read as white in grayscale files of more than 8 bits."""
        return white_level_for(self.bit_depth)

    @classmethod
    def for_backbone(cls, extractor: Any, minmax: bool = True) -> Preprocessor:
        """A preprocessor with the extractor's input size and normalization constants."""
        return cls(extractor.input_size, extractor.mean, extractor.std, minmax=minmax)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` in [0, 1] -> min-max scaled, then mean/std normalized."""
        view = (1, 3, 1, 1)
        rng = (self.channel_max - self.channel_min).clamp_min(MIN_RANGE)
        x = (x01 - self.channel_min.view(view)) / rng.view(view)
        return (x - self.mean.view(view)) / self.std.view(view)

    @torch.no_grad()
    def fit_minmax(self, batches: Iterable[torch.Tensor]) -> Preprocessor:
        """Set the per-channel min/max from training batches (streamed, ``[B, 3, h, w]``).

        A no-op when min-max scaling is disabled. Raises ``VitqcError`` on an empty split.
        """
        if not self.minmax:
            return self
        lo: torch.Tensor | None = None
        hi: torch.Tensor | None = None
        for batch in batches:
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise VitqcError(
                    f"expected batches of shape [B, 3, h, w], got {tuple(batch.shape)}"
                )
            if batch.shape[0] == 0:
                continue
            b = batch.detach().float()
            bmin = b.amin(dim=(0, 2, 3)).cpu()
            bmax = b.amax(dim=(0, 2, 3)).cpu()
            lo = bmin if lo is None else torch.minimum(lo, bmin)
            hi = bmax if hi is None else torch.maximum(hi, bmax)
        if lo is None or hi is None:
            raise VitqcError("cannot fit min-max scaling: no training images")
        self.channel_min.copy_(lo)
        self.channel_max.copy_(hi)
        self.minmax_fitted = True
        return self

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this preprocessor, as plain JSON values."""
        return {
            "image_size": list(self.image_size),
            "bit_depth": self.bit_depth,
            "mean": [float(v) for v in self.mean.tolist()],
            "std": [float(v) for v in self.std.tolist()],
            "minmax": self.minmax,
            "minmax_fitted": self.minmax_fitted,
            "channel_min": [float(v) for v in self.channel_min.tolist()],
            "channel_max": [float(v) for v in self.channel_max.tolist()],
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocessor:
        try:
            return cls(
                image_size=tuple(config["image_size"]),  # type: ignore[arg-type]
                mean=config["mean"],
                std=config["std"],
                minmax=bool(config.get("minmax", True)),
                channel_min=config.get("channel_min"),
                channel_max=config.get("channel_max"),
                minmax_fitted=bool(config.get("minmax_fitted", False)),
                bit_depth=int(config.get("bit_depth", 8)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VitqcError(f"invalid preprocessor config: {exc}") from exc

    def fingerprint(self) -> str:
        """A short stable hash of the values; part of feature-cache keys."""
        blob = json.dumps(self.config(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, minmax={self.minmax}"
