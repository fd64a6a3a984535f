"""Training-free Gaussian head: PaDiM's per-position Gaussian through the shared whitening.

``FeatureStandardizer(mode="position-whiten")`` already whitens each grid position with
its (Ledoit-Wolf shrunk) channel covariance from the training split, so a patch's squared
norm after it *is* its Mahalanobis distance under PaDiM's model. This head is that and
nothing more: ``0.5 * mean_c z^2`` per patch (the flow's patch score with an identity
flow), each layer on its own grid, averaged at the finest grid. It is the fast member of
the density family and the point the flow and the GMM start from.

Per-layer statistics keep memory small on fine grids: EfficientNet-Lite0's stride-4 stage
(24 channels on 56 x 56) needs 1.8 M whitening values, against 97 M for a fused map of
three stages. Wider backbones (DINOv2's 384 or DeiT's 768 channels per position,
ResNet-50's stages) would need more than ``MAX_WHITENING_VALUES``: there each layer keeps
a seeded random subset of its channels, the largest whose per-position whitening fits an
equal share of that limit (PaDiM's own remedy, random dimensionality reduction), see
:func:`whitened_channels`. ``standardize="whiten"`` is the position-free variant (one
Gaussian for every position), for parts that are not aligned from image to image.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vitqc.heads.base import MAX_WHITENING_VALUES, FeatureStandardizer, Head, fuse_maps


def whitened_channels(channels: list[int], sizes: list[tuple[int, int]]) -> list[int]:
    """Channels each layer keeps for a per-position whitening: all of them, or the most
    whose ``positions x channels^2`` values fit an equal share of the limit."""
    share = MAX_WHITENING_VALUES // len(channels)
    return [min(c, math.isqrt(share // (h * w))) for c, (h, w) in zip(channels, sizes, strict=True)]


class GaussianHead(Head):
    name = "gaussian"
    trainable = False

    def __init__(
        self,
        feature_channels: list[int],
        feature_sizes: list[tuple[int, int]],
        standardize: str = "position-whiten",
        fuse: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(feature_channels, feature_sizes)
        self.standardization, self.fuse, self.seed = standardize, fuse, seed
        kept = list(self.feature_channels)
        if standardize == "position-whiten" and not fuse:
            kept = whitened_channels(kept, self.feature_sizes)
        generator = torch.Generator().manual_seed(seed)
        self.subsets = [k < c for k, c in zip(kept, self.feature_channels, strict=True)]
        for i, (k, c) in enumerate(zip(kept, self.feature_channels, strict=True)):
            subset = torch.randperm(c, generator=generator)[:k].sort().values
            if k < c:  # only then: narrow backbones keep the state dict they always had
                self.register_buffer(f"channels_{i}", subset)
        self.standardize = FeatureStandardizer(
            kept, self.feature_sizes, mode=standardize, fuse=fuse
        )

    def _select(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            f.index_select(1, getattr(self, f"channels_{i}")) if subset else f
            for i, (f, subset) in enumerate(zip(features, self.subsets, strict=True))
        ]

    def prepare(
        self, train_features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        self.standardize.fit_or_copy(self._select(train_features), fitted)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        z = self.standardize(self._select(features))
        return fuse_maps([0.5 * layer.pow(2).mean(1) for layer in z])

    def config(self) -> dict[str, Any]:
        return {"standardize": self.standardization, "fuse": self.fuse, "seed": self.seed}
