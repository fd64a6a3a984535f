"""FastFlow-style 2-D normalizing flow head (paper §3.2), built from FrEIA AllInOneBlocks.

One flow per feature map; each flow step is an ``AllInOneBlock`` (as
``FoldedAllInOneBlock``, the same block in fewer passes) whose coupling subnet is
conv-ReLU-conv with kernels alternating 3x3 / 1x1, affine clamping 2.0 and hard
permutations. Trained by maximum likelihood; the patch score is the per-patch negative
log-likelihood under the standard-normal base, ``0.5 * mean_c z^2`` (log-determinant
left out, as in FastFlow and the paper's code), averaged over the feature maps.

Inputs are standardized per channel and grid position (FastFlow normalizes each map with
a LayerNorm over channels *and* positions for the same reason: CNN features near the
border have their own statistics). On magnetic_tile (EfficientNet-Lite0, 60 epochs) this
raised image AUROC 0.910 -> 0.926, pixel AUROC 0.783 -> 0.791, AUPRO 0.697 -> 0.711 over
per-channel statistics. Where the features are narrow enough (EfficientNet-Lite, see the
registry), ``standardize="position-whiten"`` goes further: each position is whitened with
its full channel covariance, so the flow starts at PaDiM's per-position Gaussian and only
has to learn what that misses; it also trains in a few epochs instead of hundreds.
``fuse=True`` runs one flow on all layers concatenated at the finest grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from vitqc.heads.base import DerivedValues, FeatureStandardizer, Head, fuse_maps


def _subnet(kernel_size: int, hidden_channels: int):
    padding = kernel_size // 2  # explicit padding: "same" breaks ONNX export

    def build(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c_in, hidden_channels, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, c_out, kernel_size, padding=padding),
        )

    return build


class FoldedAllInOneBlock(AllInOneBlock):
    """FrEIA's ``AllInOneBlock``, its forward pass with fewer passes over the activations:
    the global affine ``x * s + o`` folded into the hard permutation's 1x1 convolution
    (weights ``W diag(s)``, bias ``W o``: one convolution instead of a product, a sum and
    the convolution) and the coupling's ``x * exp(j) + t`` as one ``addcmul``. The same
    parameters (a bundle's state dict loads either way), the same outputs and gradients
    to float rounding; the inverse and the GIN variant are FrEIA's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived = DerivedValues()

    def _folded_permutation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W diag(s), W o, sum log s)`` from the block's parameters."""
        scale = self.global_scale_activation(self.global_scale)  # [1, C, 1...]
        weight = self.w_perm * scale.reshape(1, -1, *([1] * self.input_rank))
        bias = self.w_perm.flatten(1) @ self.global_offset.flatten()
        return weight, bias, torch.sum(torch.log(scale))

    def _permute(self, x: torch.Tensor, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if rev or self.GIN:
            return super()._permute(x, rev)
        if torch.is_grad_enabled() and not torch.jit.is_tracing():  # training: gradients
            weight, bias, log_jac = self._folded_permutation()  # reach the global affine
        else:  # inference (and an export's constants): made once per change of the parameters
            sources = [self.w_perm, self.global_scale, self.global_offset]
            weight, bias, log_jac = self._derived.get(
                "permutation", sources, self._folded_permutation
            )
        return self.permute_function(x, weight, bias), log_jac

    def _affine(
        self, x: torch.Tensor, a: torch.Tensor, rev: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if rev or self.GIN:
            return super()._affine(x, a, rev)
        a *= 0.1  # FrEIA's scaling of the coupling coefficients
        # the coupling's width as a constant (``x.shape[1]`` would trace as shape
        # arithmetic) and one split: fewer nodes in an exported graph
        log_scale, shift = torch.split(a, self.splits[1], dim=1)
        log_scale = self.clamp * torch.tanh(log_scale)
        if torch.jit.is_tracing():  # addcmul exports as two products and a sum
            out = shift + x * torch.exp(log_scale)
        else:
            out = torch.addcmul(shift, x, torch.exp(log_scale))
        return out, torch.sum(log_scale, dim=self.sum_dims)


def build_flow(
    channels: int, size: tuple[int, int], steps: int, hidden_channels: int, clamp: float
) -> SequenceINN:
    flow = SequenceINN(channels, *size)
    for i in range(steps):
        flow.append(
            FoldedAllInOneBlock,
            subnet_constructor=_subnet(3 if i % 2 == 0 else 1, hidden_channels),
            affine_clamping=clamp,
            permute_soft=False,
        )
    return flow


class FlowHead(Head):
    name = "flow"
    mixed_precision = True

    def __init__(
        self,
        feature_channels: list[int],
        feature_sizes: list[tuple[int, int]],
        steps: int = 20,
        hidden_ratio: float = 0.16,
        min_hidden: int = 32,
        clamp: float = 2.0,
        standardize: str = "position",
        fuse: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(feature_channels, feature_sizes)
        self.steps, self.hidden_ratio, self.min_hidden = steps, hidden_ratio, min_hidden
        self.clamp, self.seed = clamp, seed
        self.standardization, self.fuse = standardize, fuse
        self.standardize = FeatureStandardizer(
            feature_channels, self.feature_sizes, mode=standardize, fuse=fuse, seed=seed
        )
        # AllInOneBlock draws its hard permutation from numpy's global RNG and the
        # subnets their initial weights from torch's: seed both, restore both, so the
        # head is the same whatever ran before it in the process.
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.flows = nn.ModuleList(
                    build_flow(c, s, steps, self.hidden_channels(c), clamp)
                    for c, s in zip(
                        self.standardize.out_channels, self.standardize.out_sizes, strict=True
                    )
                )
        finally:
            np.random.set_state(state)
        # channels-last convolutions: oneDNN's layout on CPU, about 10 % off a training
        # step of the Lite0 flow; the inputs follow in _latents
        self.flows.to(memory_format=torch.channels_last)

    def hidden_channels(self, channels: int) -> int:
        """hidden ratio x channels, floored so small CNN stages keep a usable subnet."""
        return max(self.min_hidden, round(self.hidden_ratio * channels))

    def prepare(
        self, train_features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        self.standardize.fit_or_copy(train_features, fitted)

    def fixed_inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.standardize(features)

    def _latents(self, inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            flow(f.contiguous(memory_format=torch.channels_last))
            for flow, f in zip(self.flows, inputs, strict=True)
        ]

    def input_loss(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for z, log_jac in self._latents(inputs):
            dims = z[0].numel()
            total = total + torch.mean(0.5 * z.pow(2).flatten(1).sum(1) - log_jac) / dims
        return total / len(self.flows)

    def input_maps(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return fuse_maps([0.5 * z.pow(2).mean(1) for z, _ in self._latents(inputs)])

    def config(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "hidden_ratio": self.hidden_ratio,
            "min_hidden": self.min_hidden,
            "clamp": self.clamp,
            "standardize": self.standardization,
            "fuse": self.fuse,
            "seed": self.seed,
        }
