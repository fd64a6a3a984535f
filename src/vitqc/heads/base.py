"""What every anomaly head shares: per-channel feature standardization and map fusion.

A head is a plain ``nn.Module`` over the list of feature maps a backbone returns. It
scores each patch independently of the other images in the batch, so an image's
score never depends on its neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FeatureStandardizer(nn.Module):
    """Per-channel mean/std of the training features, or a PCA whitening, as buffers.

    Density heads train faster and more stably on unit-scale inputs. ``whiten=True``
    also decorrelates the channels (training covariance -> identity), which a diagonal
    Gaussian mixture cannot model itself: backbone channels are strongly correlated.
    The statistics come from the training split only and travel with the weights.
    """

    def __init__(self, channels: list[int], whiten: bool = False) -> None:
        super().__init__()
        self.whiten = whiten
        for i, c in enumerate(channels):
            self.register_buffer(f"mean_{i}", torch.zeros(c))
            self.register_buffer(f"std_{i}", torch.ones(c))
            if whiten:
                self.register_buffer(f"whitening_{i}", torch.eye(c))
        self.n_layers = len(channels)

    @torch.no_grad()
    def fit(self, features: list[torch.Tensor]) -> None:
        for i, f in enumerate(features):
            flat = f.transpose(0, 1).reshape(f.shape[1], -1).double()
            mean = flat.mean(1)
            getattr(self, f"mean_{i}").copy_(mean.float())
            getattr(self, f"std_{i}").copy_(flat.std(1).clamp_min(1e-6).float())
            if self.whiten:
                centered = flat - mean[:, None]
                cov = centered @ centered.T / max(1, flat.shape[1] - 1)
                eigval, eigvec = torch.linalg.eigh(cov)
                # floor tiny eigenvalues so near-constant directions are not blown up
                eigval = eigval.clamp_min(1e-4 * float(eigval.max()))
                getattr(self, f"whitening_{i}").copy_((eigvec / eigval.sqrt()).T.float())

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, f in enumerate(features):
            mean = getattr(self, f"mean_{i}").view(1, -1, 1, 1)
            if self.whiten:
                out.append(torch.einsum("oc,bchw->bohw", getattr(self, f"whitening_{i}"), f - mean))
            else:
                out.append((f - mean) / getattr(self, f"std_{i}").view(1, -1, 1, 1))
        return out


def fuse_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Average per-layer patch maps ``[B, h_i, w_i]`` at the finest grid (bilinear)."""
    if len(maps) == 1:
        return maps[0]
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    resized = [
        m
        if m.shape[-2:] == size
        else F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        for m in maps
    ]
    return torch.stack(resized).mean(0)


class Head(nn.Module):
    """Base class: ``prepare`` on training features, ``loss`` to train, ``forward`` to score."""

    name: str = "head"
    trainable: bool = True

    def __init__(self, feature_channels: list[int], feature_sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.feature_channels = list(feature_channels)
        self.feature_sizes = [tuple(s) for s in feature_sizes]

    def prepare(self, train_features: list[torch.Tensor]) -> None:
        """Data-dependent set-up from the training split (statistics, initialization)."""

    def loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no training loss")

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-patch anomaly score ``[B, h, w]`` at the finest feature grid."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able, to rebuild the head from a bundle."""
        raise NotImplementedError
