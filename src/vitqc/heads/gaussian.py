"""Training-free Gaussian head: PaDiM's per-position Gaussian through the shared whitening.

``FeatureStandardizer(mode="position-whiten")`` already whitens each grid position with
its (Ledoit-Wolf shrunk) channel covariance from the training split, so a patch's squared
norm after it *is* its Mahalanobis distance under PaDiM's model. This head is that and
nothing more: ``0.5 * mean_c z^2`` per patch (the flow's patch score with an identity
flow), each layer on its own grid, averaged at the finest grid. It is the fast member of
the density family and the point the flow and the GMM start from.

Per-layer statistics keep memory small on fine grids (EfficientNet-Lite0's stride-4
stage whitens per layer where a fused map of three stages would be refused), and layers
too wide to whiten per position keep a seeded channel subset (``FeatureStandardizer``).
``standardize="whiten"`` is the position-free variant (one Gaussian for every position),
for parts that are not aligned from image to image.
"""

from __future__ import annotations

from typing import Any

import torch

from vitqc.heads.base import FeatureStandardizer, Head, fuse_maps


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
        self.standardize = FeatureStandardizer(
            self.feature_channels, self.feature_sizes, mode=standardize, fuse=fuse, seed=seed
        )
        self.register_load_state_dict_pre_hook(_subsets_moved_into_the_standardizer)

    def prepare(
        self, train_features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        self.standardize.fit_or_copy(train_features, fitted)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return fuse_maps([0.5 * layer.pow(2).mean(1) for layer in self.standardize(features)])

    def config(self) -> dict[str, Any]:
        return {"standardize": self.standardization, "fuse": self.fuse, "seed": self.seed}


def _subsets_moved_into_the_standardizer(module, state_dict, prefix, *args) -> None:
    """Bundles saved before the channel subset moved into ``FeatureStandardizer`` hold it
    as the head's ``channels_{i}``: read it where it lives now."""
    for key in [k for k in state_dict if k.startswith(prefix + "channels_")]:
        state_dict[prefix + "standardize." + key[len(prefix) :]] = state_dict.pop(key)
