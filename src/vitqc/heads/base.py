"""What every anomaly head shares: per-channel feature standardization and map fusion.

A head is a plain ``nn.Module`` over the list of feature maps a backbone returns. It
scores each patch independently of the other images in the batch, so an image's
score never depends on its neighbours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitqc.errors import VitqcError
from vitqc.resampling import resample

STANDARDIZATIONS = ("channel", "position", "whiten", "position-whiten")
#: Largest per-position whitening (positions x channels^2 values) kept with the weights:
#: 152 fused EfficientNet-Lite channels on a 28 x 28 grid need 18 M; DeiT's 768 channels
#: on 14 x 14 would need 116 M (460 MB), too much to carry in a model bundle.
MAX_WHITENING_VALUES = 32_000_000


def whitened_channels(channels: list[int], sizes: list[tuple[int, int]]) -> list[int]:
    """Channels each layer keeps for a per-position whitening: all of them, or the most
    whose ``positions x channels^2`` values fit an equal share of the limit."""
    share = MAX_WHITENING_VALUES // len(channels)
    return [min(c, math.isqrt(share // (h * w))) for c, (h, w) in zip(channels, sizes, strict=True)]


def _finest(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    return max(sizes, key=lambda s: s[0] * s[1])


def at_finest(features: list[torch.Tensor], neighbourhood: int = 1) -> list[torch.Tensor]:
    """The maps (optionally averaged over a ``neighbourhood`` x ``neighbourhood``
    window) brought to the finest grid (bilinear)."""
    size = _finest([tuple(f.shape[-2:]) for f in features])
    out = []
    for f in features:
        if neighbourhood > 1:
            f = F.avg_pool2d(
                f, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False
            )
        out.append(resample(f, size))
    return out


def concat_at_finest(features: list[torch.Tensor], neighbourhood: int = 1) -> torch.Tensor:
    """``[B, sum C, h, w]``: ``at_finest``'s maps concatenated."""
    return torch.cat(at_finest(features, neighbourhood), 1)


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of centred samples ``x [..., N, C]``, batched over
    the leading dimensions (scikit-learn's ``ledoit_wolf(..., assume_centered=True)``).

    A covariance of C channels from N images is singular for N <= C and noisy for N of a
    few C. The weight of the scaled identity is estimated from the data: about 0.5 for 48
    images of 112 channels, about 0.06 for 609 images of 152 (magnetic_tile), so few
    training images give a whitening close to per-position standardization instead of
    amplifying directions the training set never varied in.
    """
    n, c = x.shape[-2], x.shape[-1]
    cov = x.transpose(-1, -2) @ x / n
    mu = cov.diagonal(dim1=-2, dim2=-1).mean(-1)
    sq_norm = cov.pow(2).sum((-2, -1))
    beta = (x.pow(2).sum(-1).pow(2).sum(-1) / n - sq_norm) / (c * n)
    delta = (sq_norm - 2 * mu * cov.diagonal(dim1=-2, dim2=-1).sum(-1) + c * mu**2) / c
    weight = (torch.minimum(beta, delta) / delta.clamp_min(1e-12)).clamp(0, 1)[..., None, None]
    eye = torch.eye(c, dtype=x.dtype, device=x.device)
    return (1 - weight) * cov + weight * mu[..., None, None] * eye


#: Values per block of work over images or positions: float64 blocks when fitting
#: statistics (16 MB), float32 products of a single image's per-position whitening. Blocks
#: that small are reused from the heap, where a float64 copy of all the training features
#: (580 MB for magnetic_tile's fused Lite0 map) touched fresh pages that cost more than the
#: statistics.
_BLOCK_VALUES = 2 << 20


def _moments(
    f: torch.Tensor, per_position: bool, covariance: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float64 mean, unbiased variance and (``covariance``) channel covariance of
    ``f [N, C, H, W]`` over the images (``per_position``: ``[C, H, W]`` each) or over
    images and positions (``[C]``, covariance ``[C, C]``), two passes over image blocks."""
    n, c = f.shape[:2]
    step = max(1, _BLOCK_VALUES // f[0].numel())
    axis = 0 if per_position else 1  # images, or images x positions as columns

    def blocks():
        for start in range(0, n, step):
            x = f[start : start + step].double()
            yield x if per_position else x.transpose(0, 1).reshape(c, -1)

    count = n if per_position else f[:, 0].numel()
    mean = sum(x.sum(axis, keepdim=True) for x in blocks()) / count
    sq, cov = 0.0, None
    for x in blocks():
        centered = x - mean
        sq = sq + centered.pow(2).sum(axis)
        if covariance:
            cov = centered @ centered.T + (0.0 if cov is None else cov)
    denom = max(1, count - 1)
    return mean.squeeze(axis), sq / denom, None if cov is None else cov / denom


class DerivedValues:
    """Values derived from tensors (a module's buffers or parameters), made when first
    asked for and again whenever a source tensor changes: replaced (``prepare``,
    ``.to()``) or written in place (``fit``, ``load_state_dict``, an optimizer step).
    Never stored with the module. Made outside inference mode and without gradients, so
    they serve calls in any mode (and a trace holds them as constants). A tensor made in
    inference mode has no version counter; it is keyed by identity alone (outside
    inference mode nothing can write to it)."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[tuple[tuple[int, int, int], ...], Any]] = {}

    def get(self, name: str, sources: list[torch.Tensor], build: Callable[[], Any]) -> Any:
        key = tuple((id(t), -1 if t.is_inference() else t._version, t.data_ptr()) for t in sources)
        made = self._made.get(name)
        if made is None or made[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                made = self._made[name] = (key, build())
        return made[1]

    def drop(self, name: str) -> None:
        self._made.pop(name, None)


class FeatureStandardizer(nn.Module):
    """Feature normalization fitted on the training split, kept as buffers.

    Density heads train faster and more stably on unit-scale inputs. Modes:
    - ``"channel"``: one mean/std per channel.
    - ``"position"``: one mean/std per channel *and* grid position. CNN features near
      the image border (zero padding) and at fixed places of aligned parts have their
      own statistics; a density that ignores that calls every border patch unusual
      (on magnetic_tile the highest GMM score of 98 % of good images sat within 16 px
      of the border with per-channel statistics; 45 % with per-position ones).
    - ``"whiten"``: per-channel mean and a PCA whitening (channel covariance ->
      identity), which a diagonal Gaussian mixture cannot model itself.
    - ``"position-whiten"``: per position, the mean and a ZCA whitening from the full
      channel correlation (Ledoit-Wolf shrunk unless ``shrink=False``, plus ``ridge`` x
      identity): a patch's squared norm is then its Mahalanobis distance under a
      per-position Gaussian (PaDiM's model), so a head starts from that baseline and
      learns what a Gaussian misses. ZCA (the
      symmetric inverse square root) keeps each channel close to its own meaning at
      every position, which the flow's convolutions over neighbouring positions need.
      Layers too wide to whiten per position within ``MAX_WHITENING_VALUES`` (DINOv2's
      384 or DeiT's 768 channels, ResNet-50's stages) keep a seeded random subset of
      their channels, the most that fit an equal share of the limit
      (:func:`whitened_channels`; PaDiM's own remedy, random dimensionality reduction);
      the subset is a buffer, and ``out_channels`` counts what is kept.

    ``fuse=True`` first brings all layers to the finest grid and concatenates them (one
    map out), so the statistics also capture correlations between layers: on
    magnetic_tile the per-position Gaussian alone scored image AUROC 0.966 on the fused
    map against 0.943 on separate layers. ``out_channels`` / ``out_sizes`` describe what
    ``forward`` returns. The statistics come from the training split only and travel
    with the weights.
    """

    def __init__(
        self,
        channels: list[int],
        sizes: list[tuple[int, int]] | None = None,
        mode: str = "channel",
        fuse: bool = False,
        ridge: float = 0.01,
        shrink: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in STANDARDIZATIONS:
            raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, got {mode!r}")
        if (mode.startswith("position") or fuse) and sizes is None:
            raise ValueError(f"{mode!r} standardization and fusion need the feature sizes")
        self.mode, self.fuse, self.ridge, self.shrink = mode, fuse, ridge, shrink
        self.subsets = [False] * len(channels)
        if mode == "position-whiten" and not fuse:
            kept = whitened_channels(list(channels), list(sizes))
            generator = torch.Generator().manual_seed(seed)
            self.subsets = [k < c for k, c in zip(kept, channels, strict=True)]
            for i, (k, c) in enumerate(zip(kept, channels, strict=True)):
                subset = torch.randperm(c, generator=generator)[:k].sort().values
                if k < c:  # only then: narrow features keep the state dict they always had
                    self.register_buffer(f"channels_{i}", subset)
            channels = kept
        if fuse:
            channels, sizes = [sum(channels)], [_finest(list(sizes))]
        self.out_channels = list(channels)
        self.out_sizes = [tuple(s) for s in sizes] if sizes is not None else None
        if mode == "position-whiten":
            values = sum(c * c * s[0] * s[1] for c, s in zip(channels, sizes, strict=True))
            if values > MAX_WHITENING_VALUES:
                raise VitqcError(
                    f"standardize=position-whiten needs {values / 1e6:.0f} M values for "
                    f"{channels} channels on {sizes} grids (limit "
                    f"{MAX_WHITENING_VALUES / 1e6:.0f} M): use standardize=position"
                )
        for i, c in enumerate(channels):
            shape = (c, *sizes[i]) if mode.startswith("position") else (c,)
            self.register_buffer(f"mean_{i}", torch.zeros(shape))
            self.register_buffer(f"std_{i}", torch.ones(shape))
            if mode == "whiten":
                self.register_buffer(f"whitening_{i}", torch.eye(c))
            elif mode == "position-whiten":
                n_positions = sizes[i][0] * sizes[i][1]
                self.register_buffer(f"whitening_{i}", torch.eye(c).repeat(n_positions, 1, 1))
        self.n_layers = len(channels)
        self._derived = DerivedValues()

    def folded_whitening(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s per-position whitening with its standardization folded in:
        ``(matrices [P, C, C], bias [P, 1, C])`` with ``W (x - m) / s == x @ matrices[p]^T
        + bias[p]`` at every position, so a call makes one pass of products over its input
        instead of two elementwise passes before it. Made on first use and again when the
        statistics change, beside the buffers, which stay what the bundle holds (a second
        copy of the whitening in memory: 72 MB for EfficientNet-Lite0's fused map)."""
        names = (f"whitening_{i}", f"mean_{i}", f"std_{i}")
        whitening, mean, std = (getattr(self, name) for name in names)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            p, c, _ = whitening.shape
            m = mean.view(c, p).T.unsqueeze(1)  # [P, 1, C]
            s = std.view(c, p).T.unsqueeze(1)
            bias = torch.bmm(m / s, whitening.transpose(1, 2)).neg_()
            return whitening / s, bias  # W diag(1 / s), -W (m / s)

        return self._derived.get(f"folded_{i}", [whitening, mean, std], build)

    def _inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.fuse:
            return [concat_at_finest(features)]
        return [
            f.index_select(1, getattr(self, f"channels_{i}")) if subset else f
            for i, (f, subset) in enumerate(zip(features, self.subsets, strict=True))
        ]

    @torch.no_grad()
    def fit(self, features: list[torch.Tensor]) -> None:
        for i, f in enumerate(self._inputs(features)):
            if self.mode == "position-whiten":
                self._fit_position_whitening(i, f)
                continue
            if self.mode == "position":
                mean, var, _ = _moments(f, per_position=True)
                getattr(self, f"mean_{i}").copy_(mean.float())
                getattr(self, f"std_{i}").copy_(var.sqrt().clamp_min(1e-3).float())
                continue
            mean, var, cov = _moments(f, per_position=False, covariance=self.mode == "whiten")
            getattr(self, f"mean_{i}").copy_(mean.float())
            getattr(self, f"std_{i}").copy_(var.sqrt().clamp_min(1e-6).float())
            if self.mode == "whiten":
                eigval, eigvec = torch.linalg.eigh(cov)
                # floor tiny eigenvalues so near-constant directions are not blown up
                eigval = eigval.clamp_min(1e-4 * float(eigval.max()))
                getattr(self, f"whitening_{i}").copy_((eigvec / eigval.sqrt()).T.float())

    def same_statistics(self, other: FeatureStandardizer) -> bool:
        """Whether ``other`` fitted on the same features holds exactly what ``fit`` would."""

        def kind(s: FeatureStandardizer) -> tuple:
            subsets = [getattr(s, f"channels_{i}").tolist() for i, k in enumerate(s.subsets) if k]
            return (s.mode, s.fuse, s.ridge, s.shrink, s.out_channels, s.out_sizes, subsets)

        return kind(self) == kind(other)

    def fit_or_copy(
        self, features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        """``fit``, or take the statistics of ``fitted`` (fitted on the same ``features``,
        e.g. the whitened Gaussian a flow or GMM was rated as) when they are the same
        kind: the per-position whitening is the costly part of preparing a head."""
        if fitted is not None and self.same_statistics(fitted):
            self.load_state_dict(fitted.state_dict())
        else:
            self.fit(features)

    def _fit_position_whitening(self, i: int, f: torch.Tensor) -> None:
        n, c, h, w = f.shape
        mean, std = getattr(self, f"mean_{i}"), getattr(self, f"std_{i}")
        whitening = getattr(self, f"whitening_{i}")
        flat = f.flatten(2)  # [N, C, P], a view
        # one block of positions at a time, all of it on one contiguous [p, N, C] copy
        block = max(1, _BLOCK_VALUES // (n * c))
        for start in range(0, h * w, block):
            cols = slice(start, min(start + block, h * w))
            x = (
                flat[:, :, cols]
                .permute(2, 0, 1)
                .to(torch.float64, memory_format=torch.contiguous_format)
            )
            m, s = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-3)
            x = (x - m) / s
            corr = ledoit_wolf(x) if self.shrink else x.transpose(1, 2) @ x / max(1, n - 1)
            corr = corr + self.ridge * torch.eye(c, dtype=corr.dtype)
            eigval, eigvec = torch.linalg.eigh(corr)
            zca = (eigvec * eigval.clamp_min(1e-12).rsqrt()[:, None, :]) @ eigvec.transpose(1, 2)
            whitening[cols] = zca.float()
            mean.view(c, -1)[:, cols] = m[:, 0].T.float()
            std.view(c, -1)[:, cols] = s[:, 0].T.float()

    def _position_major(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each output layer's input as a new ``[P, B, C]`` tensor (positions, images,
        channels), what the per-position products take, a view of one image-major
        ``[B, P, C]`` copy: the layers of a fused map are resampled and laid out straight
        into it (no concatenated ``[B, C, h, w]`` map, no separate transposed copy). Each
        image's ``[C, P]`` is transposed as a whole; written position-major, the copy
        read channels ``P`` values apart, 7x slower at batch 32 (BLAS takes the view as
        it is)."""
        layers = [at_finest(features)] if self.fuse else [[f] for f in self._inputs(features)]
        return [
            torch.cat([f.flatten(2).transpose(1, 2) for f in parts], 2).transpose(0, 1)
            for parts in layers
        ]

    def _whiten_rows(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s ``[P, B, C]`` input standardized and whitened per position, in
        the same layout: one product with the folded matrices (``folded_whitening``)."""
        matrices, bias = self.folded_whitening(i)
        if x.shape[1] == 1 and not (torch.jit.is_tracing() or x.requires_grad):  # out=: no grad
            return single_image_products(matrices, x, bias)
        return per_position_products(matrices, x, bias)

    def whitened_rows(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``position-whiten`` only: each output layer as the products leave it,
        ``[P, B, C]`` (``forward`` returns ``[B, C, h, w]`` views of these). A head that
        reads patch rows position-major takes them so; in an exported graph every
        change of layout is a copy."""
        return [self._whiten_rows(i, x) for i, x in enumerate(self._position_major(features))]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.mode == "position-whiten":  # [B, C, h, w] views with contiguous channels,
            # the layout the flow's channels-last convolutions read
            return [
                rows.permute(1, 2, 0).reshape(rows.shape[1], rows.shape[2], *size)
                for rows, size in zip(self.whitened_rows(features), self.out_sizes, strict=True)
            ]
        out = []
        for i, f in enumerate(self._inputs(features)):
            mean, std = getattr(self, f"mean_{i}"), getattr(self, f"std_{i}")
            if self.mode == "position":
                out.append((f - mean) / std)
            elif self.mode == "whiten":
                centered = f - mean.view(1, -1, 1, 1)
                out.append(torch.einsum("oc,bchw->bohw", getattr(self, f"whitening_{i}"), centered))
            else:
                out.append((f - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
        return out


def per_position_products(
    matrices: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``x [P, B, C] @ matrices[p]^T + bias [P, 1, C]``: one matrix product per
    position, the stored ``[P, C, C]`` used in place as the transposed right-hand side
    (BLAS reads it so; einsum copied it on every call), channels contiguous in the
    result."""
    return torch.baddbmm(bias, x, matrices.transpose(1, 2))


def _products_by_blocks(
    matrices: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``x [P, 1, C] @ matrices[p]^T + bias`` as products and row sums over blocks of
    positions, one reused buffer of ``_BLOCK_VALUES`` values."""
    p, c, _ = matrices.shape
    step = max(1, _BLOCK_VALUES // (c * c))
    out = x.new_empty(p, 1, c)
    products = x.new_empty(min(step, p), c, c)
    for start in range(0, p, step):
        block = matrices[start : start + step]
        n = block.shape[0]
        torch.mul(block, x[start : start + n], out=products[:n])
        torch.sum(products[:n], 2, out=out[start : start + n, 0])
    return out.add_(bias)


def _products_by_columns(
    matrices: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``x [P, 1, C] @ matrices[p]^T + bias`` as ``matrices[p] @ x[p]^T``: one
    matrix-vector product per position over the stored rows (the ``[P, C, 1]`` result
    and ``[P, 1, C]`` are the same memory)."""
    return torch.baddbmm(bias.transpose(1, 2), matrices, x.transpose(1, 2)).transpose(1, 2)


SINGLE_IMAGE_KERNELS: dict[
    str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
] = {
    "rows": per_position_products,
    "blocks": _products_by_blocks,
    "columns": _products_by_columns,
}
#: The kernel ``single_image_products`` timed fastest, per shape of the matrices.
_fastest_kernel: dict[tuple[int, ...], str] = {}


def single_image_products(
    matrices: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One image's per-position products ``x [P, 1, C] @ matrices[p]^T + bias``, by
    whichever kernel of ``SINGLE_IMAGE_KERNELS`` ran faster on this machine for these
    shapes, timed on the first call (best of 3, alternating).

    The product only has to stream the matrices once, but how fast a kernel does so
    depends on the CPU, its BLAS and the matrices' size: ``bmm`` with one row per
    position ran near memory speed on an Intel Xeon; on an AMD EPYC it was fastest for
    matrices that stay in cache (Lite0's separate layers), while matrix-vector products
    streamed the 72 MB of a fused Lite0 map fastest (twice the speed of rows).
    """
    key = tuple(matrices.shape)
    name = _fastest_kernel.get(key)
    if name is None:
        best = dict.fromkeys(SINGLE_IMAGE_KERNELS, math.inf)
        for _ in range(3):
            for kernel_name, kernel in SINGLE_IMAGE_KERNELS.items():
                start = time.perf_counter()
                kernel(matrices, x, bias)
                best[kernel_name] = min(best[kernel_name], time.perf_counter() - start)
        name = _fastest_kernel[key] = min(best, key=best.__getitem__)
    return SINGLE_IMAGE_KERNELS[name](matrices, x, bias)


def fuse_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Average per-layer patch maps ``[B, h_i, w_i]`` at the finest grid (bilinear)."""
    if len(maps) == 1:
        return maps[0]
    size = _finest([tuple(m.shape[-2:]) for m in maps])
    return torch.stack([resample(m, size) for m in maps]).mean(0)


class Head(nn.Module):
    """Base class: ``prepare`` on training features, ``loss`` to train, ``forward`` to score."""

    name: str = "head"
    trainable: bool = True
    #: Training may run the head's products in bfloat16 (``vitqc.training``); set where
    #: measured not to change the trained model's figures (the flow).
    mixed_precision: bool = False

    def __init__(self, feature_channels: list[int], feature_sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.feature_channels = list(feature_channels)
        self.feature_sizes = [tuple(s) for s in feature_sizes]

    def prepare(
        self,
        train_features: list[torch.Tensor],
        fitted: FeatureStandardizer | None = None,
    ) -> None:
        """Data-dependent set-up from the training split (statistics, initialization);
        ``fitted``: a standardizer already fitted on these features, reused when it is
        the kind this head uses (``FeatureStandardizer.fit_or_copy``)."""

    def prepare_export(self) -> None:
        """Build what a trace of ``forward`` reads beside the head's own tensors (values
        derived from them), so the graph holds them as constants instead of the steps
        that derive them (``vitqc.export``)."""

    def fixed_inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The features through the part of the head training leaves unchanged (its
        fitted standardization): what ``input_loss`` takes, so the training loop
        computes it once per run instead of once per step."""
        return features

    def input_loss(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The training loss of ``fixed_inputs(features)``."""
        raise NotImplementedError(f"{self.name} has no training loss")

    def loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.input_loss(self.fixed_inputs(features))

    def input_maps(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Patch maps from inputs already through the fixed part:
        ``forward(features) == input_maps(fixed_inputs(features))``. Ratings during
        training score these, the fixed part computed once for all of them."""
        raise NotImplementedError(f"{self.name} scores its features in forward")

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-patch anomaly score ``[B, h, w]`` at the finest feature grid."""
        return self.input_maps(self.fixed_inputs(features))

    def score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(forward(features), image scores [B] or None)`` in one pass; None lets the
        model aggregate the map. A head with its own image score (VT-ADL) overrides this
        so that map and score share one pass of its network."""
        return self(features), None

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-able, to rebuild the head from a bundle."""
        raise NotImplementedError
