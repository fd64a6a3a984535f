"""Gaussian-mixture density head (paper §3.2), with the papers' code bugs fixed.

Small MLPs produce the mixture weights, means and standard deviations of a
*multivariate* diagonal Gaussian mixture per feature map; the patch score is the
negative log-likelihood ``-log sum_k pi_k N(x; mu_k, diag(sigma_k^2))``, computed with
log-sum-exp over components of (log weight + sum over dimensions of the log density).
No sampling anywhere: evaluation is deterministic.

What the MLPs are conditioned on:
- ``"position"`` (default): a learned embedding of the patch's grid position, so the
  mixture can differ between, say, the border and the centre of a part, but never
  sees the vector it scores.
- ``"shared"``: one mixture for every position (a classic GMM trained by SGD); the
  default on features whitened per position, which already carry the position
  (``backbones.registry``).
- ``"embedding"``: the paper's variant, conditioned on the very embedding it scores.
  The head can then place a component on its input and call everything likely; kept
  only to reproduce the paper.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitqc.heads.base import DerivedValues, FeatureStandardizer, Head, fuse_maps

CONDITIONINGS = ("position", "shared", "embedding")
#: Training patches the EM start is fitted on (a seeded random subset beyond that).
EM_POINTS = 20_000
_LOG_2PI = math.log(2 * math.pi)


#: How far below the largest term a log-sum-exp keeps terms: exp of anything lower is
#: a subnormal float (or zero), which CPUs compute tens of times slower than normal
#: floats, while it adds nothing a float32 or float64 sum dominated by the largest term
#: (1) can hold.
_LOG_FLOOR = -80.0


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp`` of finite terms over ``dim``, with terms more than
    ``-_LOG_FLOOR`` below the largest left out (they round away). The largest term is a
    constant for autograd, so the gradient is the softmax of the terms kept, as
    ``torch.logsumexp``'s."""
    peak = x.detach().amax(dim, keepdim=True)
    return (x - peak).clamp_min(_LOG_FLOOR).exp().sum(dim).log() + peak.squeeze(dim)


def mixture_nll(
    x: torch.Tensor, logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of ``x [..., D]`` under a diagonal Gaussian mixture.

    ``logits [..., K]``, ``mean`` and ``std [..., K, D]`` broadcast against ``x``.
    """
    z = (x.unsqueeze(-2) - mean) / std
    log_density = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1) - std.log().sum(-1)
    return -logsumexp(F.log_softmax(logits, dim=-1) + log_density, dim=-1)


def fit_diagonal_gmm(
    x: torch.Tensor,
    n_components: int,
    iterations: int = 30,
    min_std: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expectation-maximization for a diagonal Gaussian mixture on ``x [N, D]``.

    Returns ``(log_weights [K], means [K, D], stds [K, D])``. Used to start the head's
    mixture where a classic GMM fit would end, so gradient training refines it (per
    position, say) instead of spending hundreds of epochs finding the components. In
    float32, twice as fast as float64 for the same start as far as the test figures tell.
    """
    x = x.float()
    n = x.shape[0]
    k = min(n_components, n)
    means = x[torch.randperm(n, generator=generator)[:k]].clone()
    var = x.var(0, unbiased=False).expand(k, -1).clone().clamp_min(min_std**2)
    log_w = torch.full((k,), -math.log(k), dtype=x.dtype)
    for _ in range(iterations):
        # E-step with the head's own mixture density (points as a batch, one position)
        terms = _shared_mixture_terms(log_w[None], means[None], var.sqrt()[None])
        resp = torch.softmax(_component_log_joint(x[:, None], *terms)[:, 0], dim=1)
        mass = resp.sum(0) + 1e-10
        means = (resp.T @ x) / mass[:, None]
        var = ((resp.T @ x.pow(2)) / mass[:, None] - means.pow(2)).clamp_min(min_std**2)
        log_w = (mass / n).log()
    if k < n_components:  # fewer points than components: repeat, equal split of weight
        reps = -(-n_components // k)
        means, var = means.repeat(reps, 1)[:n_components], var.repeat(reps, 1)[:n_components]
        log_w = log_w.repeat(reps)[:n_components] - math.log(reps)
    return log_w, means, var.sqrt()


class MixtureDensity(nn.Module):
    """Mixture parameters for one feature map of ``dim`` channels on a ``grid``."""

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        n_components: int,
        conditioning: str,
        hidden: int,
        min_std: float,
    ) -> None:
        super().__init__()
        self.dim, self.k, self.conditioning, self.min_std = dim, n_components, conditioning, min_std
        n_positions = grid[0] * grid[1]
        if conditioning == "embedding":
            cond_dim = dim
        elif conditioning == "position":
            cond_dim = hidden
            self.position = nn.Parameter(0.02 * torch.randn(n_positions, hidden))
        else:
            cond_dim = hidden
            self.position = nn.Parameter(torch.zeros(1, hidden))
        self.trunk = nn.Sequential(nn.Linear(cond_dim, hidden), nn.GELU())
        self.to_logits = nn.Linear(hidden, n_components)
        self.to_mean = nn.Linear(hidden, n_components * dim)
        self.to_std = nn.Linear(hidden, n_components * dim)
        self._derived = DerivedValues()

    @torch.no_grad()
    def init_from_data(
        self, patches: torch.Tensor, generator: torch.Generator, max_points: int = EM_POINTS
    ) -> None:
        """Start every position's mixture at an EM fit of the training patches.

        The output layers' weights shrink so that at step 0 the head is that classic GMM
        (whatever the conditioning); training then learns how the mixture varies.
        """
        if patches.shape[0] > max_points:
            patches = patches[torch.randperm(patches.shape[0], generator=generator)[:max_points]]
        log_w, means, stds = fit_diagonal_gmm(
            patches, self.k, min_std=self.min_std * 1.5, generator=generator
        )
        for layer in (self.to_mean, self.to_std, self.to_logits):
            layer.weight.mul_(0.01)
        self.to_mean.bias.copy_(means.reshape(-1))
        # softplus(b) + min_std == std  <=>  b = log(expm1(std - min_std))
        self.to_std.bias.copy_(torch.log(torch.expm1(stds - self.min_std)).reshape(-1))
        self.to_logits.bias.copy_(log_w)

    def parameters_for(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, mean, std)`` of the mixture given the conditioning input."""
        h = self.trunk(cond)
        logits = self.to_logits(h)
        mean = self.to_mean(h).unflatten(-1, (self.k, self.dim))
        std = F.softplus(self.to_std(h)).unflatten(-1, (self.k, self.dim)) + self.min_std
        return logits, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NLL per patch: ``x [B, P, D] -> [B, P]``."""
        if self.conditioning == "embedding":
            return mixture_nll(x, *self.parameters_for(x))
        if self.training:
            terms = _shared_mixture_terms(*self.parameters_for(self.position))
        else:
            # The mixture does not depend on the input: at inference compute it once,
            # not once per batch (at batch 1 that was most of the head's time), around
            # the components' centre (see _inference_terms), so float32 suffices: a
            # call reads all of it, and an image's score depends on its batch only by
            # rounding.
            return self.position_major_nll(x.transpose(0, 1))
        return _shared_mixture_nll_from_terms(x, *terms)

    def inference_terms(self) -> tuple[torch.Tensor, ...]:
        """``_inference_terms`` of the mixture's parameters, made once per change of
        them (a training step, ``load_state_dict``, ``.to()``; not for the ``"embedding"``
        conditioning)."""
        return self._derived.get(
            "terms",
            list(self.parameters()),
            lambda: _inference_terms(*self.parameters_for(self.position)),
        )

    def position_major_nll(self, rows: torch.Tensor) -> torch.Tensor:
        """Inference NLL of patch rows laid out position-major: ``[P, B, D] -> [B, P]``
        (not for the ``"embedding"`` conditioning)."""
        return _inference_nll(rows, *self.inference_terms())


def _shared_mixture_terms(
    logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """What ``_shared_mixture_nll`` needs of the parameters, computed once per set."""
    inv_var = std.pow(-2)
    log_norm = F.log_softmax(logits, dim=-1) - std.log().sum(-1) - 0.5 * mean.shape[-1] * _LOG_2PI
    return inv_var, mean * inv_var, (mean.pow(2) * inv_var).sum(-1), log_norm


def _component_log_joint(
    x: torch.Tensor,
    inv_var: torch.Tensor,
    mean_inv_var: torch.Tensor,
    mean_sq: torch.Tensor,
    log_norm: torch.Tensor,
) -> torch.Tensor:
    """``log pi_k + log N(x; mu_k, sigma_k^2)`` for every component: ``[B, P, K]``."""
    if inv_var.shape[0] == 1:  # one mixture for every position: one matrix product each
        quad = x.pow(2) @ inv_var[0].T - 2 * (x @ mean_inv_var[0].T) + mean_sq
    else:
        quad = (
            torch.einsum("bpd,pkd->bpk", x.pow(2), inv_var)
            - 2 * torch.einsum("bpd,pkd->bpk", x, mean_inv_var)
            + mean_sq
        )
    return log_norm - 0.5 * quad.clamp_min(0)


def _inference_terms(
    logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The mixture laid out for ``_inference_nll``: ``[P, 2D, K]`` weights of
    ``[y^2, y]`` for ``y`` the input less the centre of the components' means (two
    matrix products per call, on row slices of it), ``[P, K]`` constants and log
    normalizers, ``[P, D]`` centre.

    Expanding the square around the centre instead of zero keeps its terms near the size
    of the result, so float32 loses no more than its rounding where the inputs lie far
    from zero (VT-ADL's embeddings). Computed at every rating of a head in training, so
    with one copy into the layout (no float64 pass, no concatenation)."""
    centre = mean.mean(-2)
    terms = _shared_mixture_terms(logits, mean - centre.unsqueeze(-2), std)
    inv_var, mean_inv_var, mean_sq, log_norm = terms
    p, k, d = inv_var.shape
    weights = inv_var.new_empty(p, 2 * d, k)
    weights[:, :d] = inv_var.transpose(1, 2)
    weights[:, d:] = mean_inv_var.transpose(1, 2).mul(-2)
    return weights, mean_sq, log_norm, centre


def _inference_nll(
    x: torch.Tensor,
    weights: torch.Tensor,
    mean_sq: torch.Tensor,
    log_norm: torch.Tensor,
    centre: torch.Tensor,
) -> torch.Tensor:
    """``_shared_mixture_nll_from_terms`` for patch rows ``x [P, B, D]`` with the terms of
    ``_inference_terms`` (per position, ``P`` of them, or shared, one): ``[B, P]``.

    Computed position-major: the per-position products take that layout, and the
    per-position whitening produces it, so the elementwise ops read contiguous rows (on
    a ``[B, P, D]`` order they ran at a fraction of memory speed). ``[y^2, y]`` is never
    concatenated: at batch 32 the copy took as long as the mixture's product."""
    p, b, d = x.shape
    y = x - centre.unsqueeze(1)
    # [y^2, y] @ weights as two products summed in the second (no concatenated copy)
    if weights.shape[0] == 1:  # one mixture for every position
        rows = y.reshape(p * b, d)
        linear = rows @ weights[0, d:]
        quad = torch.addmm(linear, rows * rows, weights[0, :d]).reshape(p, b, -1)
    else:
        quad = torch.baddbmm(torch.bmm(y, weights[:, d:]), y * y, weights[:, :d])
    joint = log_norm.unsqueeze(1) - 0.5 * (quad + mean_sq.unsqueeze(1)).clamp_min(0)
    return -logsumexp(joint, dim=-1).T


def _shared_mixture_nll_from_terms(x: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:
    return -logsumexp(_component_log_joint(x, *terms), dim=-1)


def _shared_mixture_nll(
    x: torch.Tensor, logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``mixture_nll`` for parameters shared over the batch (``[P or 1, K, D]``).

    Expands the square so memory is ``B x P x K`` instead of ``B x P x K x D``.
    """
    return _shared_mixture_nll_from_terms(x, *_shared_mixture_terms(logits, mean, std))


class GMMHead(Head):
    name = "gmm"

    def __init__(
        self,
        feature_channels: list[int],
        feature_sizes: list[tuple[int, int]],
        n_components: int = 100,
        conditioning: str = "position",
        hidden: int = 64,
        min_std: float = 0.05,
        standardize: str = "position",
        fuse: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(feature_channels, feature_sizes)
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.n_components, self.conditioning, self.hidden = n_components, conditioning, hidden
        self.min_std, self.seed = min_std, seed
        self.standardization, self.fuse = standardize, fuse
        self.standardize = FeatureStandardizer(
            feature_channels, self.feature_sizes, mode=standardize, fuse=fuse, seed=seed
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.mixtures = nn.ModuleList(
                MixtureDensity(c, s, n_components, conditioning, hidden, min_std)
                for c, s in zip(
                    self.standardize.out_channels, self.standardize.out_sizes, strict=True
                )
            )

    def prepare(
        self, train_features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        self.standardize.fit_or_copy(train_features, fitted)
        generator = torch.Generator().manual_seed(self.seed)
        n = train_features[0].shape[0]
        for i, mixture in enumerate(self.mixtures):
            h, w = self.standardize.out_sizes[i]
            # the patches init_from_data would draw (same generator), standardized a block
            # of images at a time rather than all of them at once
            take = torch.arange(n * h * w)
            if take.numel() > EM_POINTS:
                take = torch.randperm(take.numel(), generator=generator)[:EM_POINTS]
            mixture.init_from_data(self._standardized_patches(train_features, i, take), generator)

    @torch.no_grad()
    def _standardized_patches(
        self, features: list[torch.Tensor], layer: int, take: torch.Tensor, block: int = 64
    ) -> torch.Tensor:
        """One layer's standardized patches ``take`` (indices into its ``[N * h * w, C]``
        patch list)."""
        h, w = self.standardize.out_sizes[layer]
        image, position = take // (h * w), take % (h * w)
        out = torch.empty(take.numel(), self.standardize.out_channels[layer])
        for start in range(0, features[0].shape[0], block):
            z = self.standardize([f[start : start + block] for f in features])[layer]
            rows = ((image >= start) & (image < start + block)).nonzero()[:, 0]
            out[rows] = z.flatten(2)[image[rows] - start, :, position[rows]]
        return out

    def fixed_inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.standardize(features)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``input_maps(fixed_inputs(features))``; at inference on per-position whitened
        features, with the patch rows handed over position-major, as the whitening
        leaves them (the same values; an exported graph then holds no transposing
        copies between the two)."""
        if (
            self.training
            or self.standardization != "position-whiten"
            or self.conditioning == "embedding"
        ):
            return super().forward(features)
        maps = [
            mixture.position_major_nll(rows).reshape(-1, *size)
            for mixture, rows, size in zip(
                self.mixtures,
                self.standardize.whitened_rows(features),
                self.standardize.out_sizes,
                strict=True,
            )
        ]
        return fuse_maps(self._per_dimension(maps))

    def _nll_maps(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = []
        for mixture, f in zip(self.mixtures, inputs, strict=True):
            b, c, h, w = f.shape
            nll = mixture(f.permute(0, 2, 3, 1).reshape(b, h * w, c))
            maps.append(nll.reshape(b, h, w))
        return maps

    def _per_dimension(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """NLL per feature dimension, so layers of different widths weigh alike."""
        return [m / c for m, c in zip(maps, self.standardize.out_channels, strict=True)]

    def input_loss(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        maps = self._per_dimension(self._nll_maps(inputs))
        return sum(m.mean() for m in maps) / len(maps)

    def input_maps(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return fuse_maps(self._per_dimension(self._nll_maps(inputs)))

    def config(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "conditioning": self.conditioning,
            "hidden": self.hidden,
            "min_std": self.min_std,
            "standardize": self.standardization,
            "fuse": self.fuse,
            "seed": self.seed,
        }
