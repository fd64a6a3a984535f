"""VT-ADL (Mishra et al., ISIE 2021): a ViT trained from scratch, a CNN decoder and a
Gaussian-mixture density network, as a vitqc head whose input "feature" is the image.

The head takes ``features = [x]`` with ``x [B, C, H, W]`` the preprocessed image (values
about [-1, 1]: the ``pixels`` backbone normalizes with mean = std = 0.5), so it runs
through the same fit / evaluate / predict / bundle path as the other heads.

Model
- Encoder: patch embedding (a convolution with kernel = stride = patch, i.e. one linear
  layer per patch), a learned position embedding, pre-norm transformer layers and a
  final LayerNorm. No class token. Output: one ``width``-vector per patch.
- Reduction (the paper's "encoder"): the token sequence to one ``latent_dim`` vector,
  either a linear projection of the flattened sequence (``"linear"``, default) or the
  token mean followed by a linear layer (``"sum"``, a scaled sum).
- Decoder: a linear layer to a small ``C x h0 x w0`` seed, then five transposed
  convolutions (BatchNorm + ReLU, tanh on the last). Each side is planned separately
  (``decoder_plan``): ``s`` stride-2 layers (kernel 4, padding 1: exact doubling) after
  ``5 - s`` stride-1 layers (kernel 3, padding 1), with ``h0 = H / 2**s``; 512 -> seed 16,
  256 -> 8, 64 -> 4, 28 -> 7 (two doublings), so those sizes are reconstructed exactly.
  A side with a large odd factor (e.g. 300) decodes to the next multiple of 32 and is
  center-cropped.
- Mixture density network: per-patch mixture weights, means and standard deviations of a
  diagonal Gaussian mixture over the patch embeddings (``vitqc.heads.gmm.MixtureDensity``;
  likelihood ``-log sum_k pi_k N(z; mu_k, sigma_k^2)`` by log-sum-exp, std =
  softplus + ``min_std``, so variances can become small; the original code used the
  upper bound ``sum_k pi_k NLL_k`` and a softplus as log-variance, i.e. variance >= 1).

Against NLL collapse. Scoring an embedding that the same optimizer can move invites a
degenerate optimum: shrink the embeddings (the decoder's linear layers undo any scale)
or cluster them onto the component means, and the NLL falls without bound while saying
nothing about normality; conditioning the mixture on the scored vector itself (the
original code) lets the network put a component on every input. Three choices close
this off:
1. The scored vector is ``layer_norm(token)`` without affine parameters: every patch
   embedding has zero mean and unit variance over its ``width`` dimensions, so the
   scale cannot shrink.
2. The NLL's gradient stops at the encoder (``joint_nll=False``, default): the encoder
   and decoder learn from reconstruction only, and the mixture fits the density of the
   embeddings they produce. Nothing rewards concentrating the embeddings, and the NLL
   is an honest density estimate of a representation learned for another purpose.
   ``joint_nll=True`` gives the paper's joint objective (bounded below only by
   ``min_std``: NLL per dimension >= log(min_std) + log(2 pi) / 2).
3. The mixture parameters are conditioned on the patch *position* by default (as the
   GMM head), never on the vector they score; ``conditioning="embedding"`` reproduces
   the paper's network and is kept for comparison only.

Loss ``NLL + lambda_mse * MSE + lambda_ssim * (1 - SSIM)``; NLL is per patch and per
embedding dimension (so it has the scale of the other terms whatever ``width``), MSE per
pixel, SSIM from ``pytorch_msssim`` (data range 2). Defaults lambda_mse = 5 and
lambda_ssim = 0.5 are the original code's weights (``5*MSE - 0.5*SSIM``). Training adds
Gaussian noise (sd ``noise_sd``, 0.2 in the original) to the tokens fed to the decoder.

Scores. ``forward`` is the anomaly map: the per-patch NLL on the patch grid (the
paper's; ``AnomalyModel`` upsamples bilinearly and smooths), or with
``anomaly_map="residual"`` the reconstruction error ``|x - recon|`` at pixel resolution.
``image_scores`` is the per-image training loss (mean patch NLL + lambda_mse MSE +
lambda_ssim (1 - SSIM): a worse reconstruction raises the score; the original added
+SSIM) with ``image_score="loss"``, or None with ``"map_max"`` so the model falls back to
the maximum of the (smoothed) map. In eval mode nothing is random (no noise, BatchNorm on
running statistics), and every score is per image. ``score_candidates`` lists the
alternatives that ``benchmarks/image_score_choice.py`` compares.

Measured (details in the issue notes):
- MNIST one-class (ten digits, 100 epochs): loss 0.861 mean image AUROC, map maximum
  0.586 (1-SSIM alone 0.924, MSE 0.905), so "loss" is the default. The per-patch NLL is
  a *local* density: a digit of another class is made of strokes and background whose
  tokens are each typical, so it does not flag semantic anomalies (for normal "8" the
  map maximum ranks every other digit *below* the 8s: AUROC 0.12-0.54), and a from-
  scratch autoencoder reconstructs thin digits better than the normal class (normal "8"
  vs "1": MSE AUROC 0.10). A knn head on pretrained features scored 0.979 on the same
  protocol.
- magnetic_tile (609 training images, 256 px, "cpu" preset, trained to early stopping):
  image AUROC 0.535 (loss) / 0.507 (map max), pixel AUROC 0.536, AUPRO 0.200, i.e.
  chance; the residual map localizes better (pixel AUROC 0.663, AUPRO 0.577) but its
  maximum is no better at detection (0.550). The flow head on EfficientNet-Lite0
  features: 0.971 / 0.809 / 0.758. Why: the 256-number bottleneck reconstructs a
  blurred tile without the grain and scratches every tile has, so the residual, MSE and
  SSIM are dominated by normal texture everywhere (a blowhole is < 0.1 % of the image);
  the tokens, trained only to feed that bottleneck, encode shading, and their per-
  position density follows shading rather than defects. Training the NLL jointly (the
  paper's objective, ``joint_nll=True``) raised AUPRO to 0.336, no more.

Presets (``VTADL_PRESETS``; ``preset=None`` picks by image side: <= 64 px "mnist",
< 512 "cpu", otherwise "paper"). Every size is also a keyword argument that overrides
the preset (``vtadl:patch_size=16`` on the command line). Costs from
``benchmarks/bench_vtadl_step.py`` (one Adam step at batch 8 over 3-channel images, one
torch thread, 2-core CPU, ms per training image):

- "mnist": 28 px, patch 4 (7 x 7 grid), width 64, depth 4, 4 heads, MLP 128, latent 64,
  decoder seed 64 x 7 x 7. 0.66 M parameters; 3-7 ms per training image, so one digit of
  the MNIST protocol (400 train + 100 validation images) takes 1.2-5 s per epoch and 100
  epochs 2-8 minutes (at lr 1e-4 the best validation epoch was 92-100 on every digit).
- "cpu": 256 px, the paper's patch 32 (8 x 8 grid), width 128, depth 4, 4 heads, MLP 256,
  latent 256, seed 128 x 8 x 8. 5.5 M parameters; 67 ms per training image (SSIM 28,
  decoder 11, encoder 8), 47 s per epoch for magnetic_tile's 609 + 152 images; early
  stopping ended it after 41 epochs in 36 minutes. Patch 16 (16 x 16 grid, 11.5 M
  parameters) costs 97 ms per image (81 s per epoch) and was still improving when an
  85-minute budget stopped it at epoch 61 (AUPRO 0.247, residual 0.601: no better).
  ``reduction="sum"`` saves a quarter (51 ms). ``--max-minutes`` caps any run.
- "paper": 512 px, patch 32, width 512, depth 6, 8 heads, MLP 1024, latent 512, seed
  256 x 16 x 16. 116 M parameters (67 M in the linear reduction); for a GPU.

On a small shared CPU use one torch thread (``torch.set_num_threads(1)``): with two
threads and another busy process, each of the many small ops waits for a descheduled
thread and training ran about 70 times slower in our measurements.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from vitqc.heads.base import FeatureStandardizer, Head
from vitqc.heads.gmm import CONDITIONINGS, MixtureDensity

#: Architecture and loss presets. ``image_size`` is the input side each was sized for
#: (the head itself takes its size from the features it is built on).
VTADL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper (review of the released code): 512 px, patch 32 (16 x 16 grid), width 512,
    # depth 6, 8 heads, MLP 1024, 10 mixture components. For a GPU.
    "paper": {
        "image_size": 512,
        "patch_size": 32,
        "width": 512,
        "depth": 6,
        "heads": 8,
        "mlp_dim": 1024,
        "latent_dim": 512,
        "decoder_channels": 256,
        "n_components": 10,
    },
    # 256 px on a small CPU: the paper's patch 32 (8 x 8 grid), width 128. Patch 16 (a
    # 16 x 16 grid) costs 1.7x per epoch and did not converge in 85 minutes on 609 images.
    "cpu": {
        "image_size": 256,
        "patch_size": 32,
        "width": 128,
        "depth": 4,
        "heads": 4,
        "mlp_dim": 256,
        "latent_dim": 256,
        "decoder_channels": 128,
        "n_components": 10,
    },
    # 28 x 28 digits: patch 4 (7 x 7 grid), decoder seed 7 x 7 with two doublings.
    "mnist": {
        "image_size": 28,
        "patch_size": 4,
        "width": 64,
        "depth": 4,
        "heads": 4,
        "mlp_dim": 128,
        "latent_dim": 64,
        "decoder_channels": 64,
        "n_components": 10,
    },
}

#: Options shared by every preset (the original code's loss weights and noise).
COMMON_DEFAULTS: dict[str, Any] = {
    "reduction": "linear",
    "conditioning": "position",
    "mdn_hidden": 64,
    "min_std": 0.01,
    "joint_nll": False,
    "noise_sd": 0.2,
    "lambda_mse": 5.0,
    "lambda_ssim": 0.5,
    "image_score": "loss",
    "anomaly_map": "nll",
}

REDUCTIONS = ("linear", "sum")
IMAGE_SCORES = ("loss", "map_max")
ANOMALY_MAPS = ("nll", "residual")
DECODER_LAYERS = 5
SSIM_DATA_RANGE = 2.0  # images normalized to [-1, 1]
SSIM_WINDOW_SIGMA = 1.5  # pytorch_msssim's default


def preset_for_size(height: int, width: int) -> str:
    """Preset used when none is named: by the longer image side."""
    side = max(height, width)
    if side <= 64:
        return "mnist"
    return "cpu" if side < 512 else "paper"


def decoder_plan(size: int, layers: int = DECODER_LAYERS, min_seed: int = 4, max_seed: int = 16):
    """``(seed, n_stride2, decoded)`` for one image side.

    As many exact doublings as the side's factors of two allow (at most ``layers``),
    keeping the seed at least ``min_seed``; when the seed would exceed ``max_seed``, all
    layers double and the output (``decoded >= size``) is center-cropped.
    """
    n = min(layers, (size & -size).bit_length() - 1)
    while n > 0 and (size >> n) < min_seed:
        n -= 1
    seed = size >> n
    if seed <= max_seed:
        return seed, n, size
    seed = -(-size // 2**layers)
    return seed, layers, seed * 2**layers


class ConvDecoder(nn.Module):
    """Linear seed + five transposed convolutions (BN + ReLU; tanh last) to ``out_size``."""

    def __init__(
        self, latent_dim: int, channels: int, out_channels: int, out_size: tuple[int, int]
    ) -> None:
        super().__init__()
        (sh, nh, dh), (sw, nw, dw) = decoder_plan(out_size[0]), decoder_plan(out_size[1])
        self.seed_shape = (channels, sh, sw)
        self.out_size = tuple(out_size)
        self.decoded_size = (dh, dw)
        self.seed = nn.Linear(latent_dim, channels * sh * sw)
        widths = [channels] + [max(channels // 2 ** (i + 1), 8) for i in range(DECODER_LAYERS - 1)]
        layers: list[nn.Module] = []
        for i in range(DECODER_LAYERS):
            # stride-1 layers first (cheap, at the seed's resolution), then the doublings
            up_h, up_w = i >= DECODER_LAYERS - nh, i >= DECODER_LAYERS - nw
            c_out = out_channels if i == DECODER_LAYERS - 1 else widths[i + 1]
            layers.append(
                nn.ConvTranspose2d(
                    widths[i],
                    c_out,
                    kernel_size=(4 if up_h else 3, 4 if up_w else 3),
                    stride=(2 if up_h else 1, 2 if up_w else 1),
                    padding=1,
                )
            )
            if i < DECODER_LAYERS - 1:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            else:
                layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.seed(z).view(z.shape[0], *self.seed_shape))
        (h, w), (dh, dw) = self.out_size, self.decoded_size
        if (dh, dw) != (h, w):
            top, left = (dh - h) // 2, (dw - w) // 2
            out = out[:, :, top : top + h, left : left + w]
        return out


class ViTEncoder(nn.Module):
    """Patch embedding + position embedding + pre-norm transformer layers (no class token)."""

    def __init__(
        self,
        in_channels: int,
        grid: tuple[int, int],
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            mlp_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, N, width]`` (row-major patch order)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.layers(tokens + self.pos_embed)


class VTADLHead(Head):
    """VT-ADL as a head over ``[image]``; see the module docstring for the design."""

    name = "vtadl"
    default_backbone = "pixels"
    backbone_families = ("pixels",)  # it learns its own encoder from the image
    #: Accepted ``**options`` (each overrides the preset), for ``vtadl:option=value``.
    option_names = tuple(
        sorted({*COMMON_DEFAULTS, *(k for p in VTADL_PRESETS.values() for k in p)} - {"image_size"})
    )

    def __init__(
        self,
        feature_channels: list[int],
        feature_sizes: list[tuple[int, int]],
        preset: str | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(feature_channels, feature_sizes)
        if len(self.feature_sizes) != 1:
            raise ValueError(
                f"vtadl trains on the image itself (--backbone pixels), got {len(feature_sizes)} "
                "feature maps"
            )
        height, width_px = self.feature_sizes[0]
        preset = preset or preset_for_size(height, width_px)
        if preset not in VTADL_PRESETS:
            raise ValueError(
                f"unknown vtadl preset {preset!r}: choose one of {list(VTADL_PRESETS)}"
            )
        values = {**COMMON_DEFAULTS, **VTADL_PRESETS[preset]}
        values.pop("image_size")
        unknown = set(options) - set(self.option_names)
        if unknown:
            raise ValueError(f"unknown vtadl options {sorted(unknown)}")
        values.update({k: v for k, v in options.items() if v is not None})
        self.preset, self.seed = preset, int(seed)
        self.options = values
        self._check(values, height, width_px)

        p = int(values["patch_size"])
        self.grid = (height // p, width_px // p)
        self.width = int(values["width"])
        self.noise_sd = float(values["noise_sd"])
        self.lambda_mse = float(values["lambda_mse"])
        self.lambda_ssim = float(values["lambda_ssim"])
        self.joint_nll = bool(values["joint_nll"])
        self.image_score = str(values["image_score"])
        self.anomaly_map = str(values["anomaly_map"])
        self.reduction = str(values["reduction"])
        n_tokens = self.grid[0] * self.grid[1]
        # SSIM's Gaussian window (pytorch_msssim's: sigma 1.5, at most 11 taps, one per
        # channel), fixed here rather than rebuilt from each batch's shape, so that the
        # exported graph holds a constant kernel; not saved (it follows from the sizes)
        taps = min(11, (min(height, width_px) - 1) // 2 * 2 + 1)
        window = torch.signal.windows.gaussian(taps, std=SSIM_WINDOW_SIGMA)
        window = (window / window.sum()).view(1, 1, 1, taps)
        channels = self.feature_channels[0]
        self.register_buffer(
            "ssim_window", window.repeat(channels, 1, 1, 1).contiguous(), persistent=False
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.encoder = ViTEncoder(
                self.feature_channels[0],
                self.grid,
                p,
                self.width,
                int(values["depth"]),
                int(values["heads"]),
                int(values["mlp_dim"]),
            )
            reduce_in = n_tokens * self.width if self.reduction == "linear" else self.width
            self.reduce = nn.Linear(reduce_in, int(values["latent_dim"]))
            self.decoder = ConvDecoder(
                int(values["latent_dim"]),
                int(values["decoder_channels"]),
                self.feature_channels[0],
                (height, width_px),
            )
            self.mixture = MixtureDensity(
                self.width,
                self.grid,
                int(values["n_components"]),
                str(values["conditioning"]),
                int(values["mdn_hidden"]),
                float(values["min_std"]),
            )

    @staticmethod
    def _check(values: dict[str, Any], height: int, width: int) -> None:
        p = int(values["patch_size"])
        if height % p or width % p:
            raise ValueError(
                f"vtadl patch_size {p} must divide the image size {height}x{width}: "
                "choose another patch_size or input size"
            )
        if int(values["width"]) % int(values["heads"]):
            raise ValueError(
                f"vtadl width {values['width']} not divisible by heads {values['heads']}"
            )
        for key, allowed in (
            ("reduction", REDUCTIONS),
            ("conditioning", CONDITIONINGS),
            ("image_score", IMAGE_SCORES),
            ("anomaly_map", ANOMALY_MAPS),
        ):
            if values[key] not in allowed:
                raise ValueError(f"vtadl {key} must be one of {allowed}, got {values[key]!r}")

    # ------------------------------------------------------------------ model pieces
    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer output tokens ``[B, N, width]``."""
        return self.encoder(x)

    def reconstruct_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_sd > 0:
            tokens = tokens + self.noise_sd * torch.randn_like(tokens)
        z = tokens.flatten(1) if self.reduction == "linear" else tokens.mean(1)
        return self.decoder(self.reduce(z))

    def patch_nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mixture NLL per patch and per embedding dimension, ``[B, N]``."""
        scored = F.layer_norm(tokens, (self.width,))
        if not self.joint_nll:
            scored = scored.detach()
        return self.mixture(scored) / self.width

    def terms(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms per image: ``nll [B, N]``, ``mse [B]``, ``ssim [B]``, ``recon``."""
        x = features[0]
        tokens = self.embeddings(x)
        recon = self.reconstruct_from_tokens(tokens)
        return {
            "nll": self.patch_nll(tokens),
            "mse": (recon - x).pow(2).flatten(1).mean(1),
            "ssim": ssim(
                recon, x, data_range=SSIM_DATA_RANGE, size_average=False, win=self.ssim_window
            ),
            "recon": recon,
        }

    def combine(self, nll: torch.Tensor, mse: torch.Tensor, ssim_: torch.Tensor) -> torch.Tensor:
        """``nll + lambda_mse * mse + lambda_ssim * (1 - ssim)``, elementwise."""
        return nll + self.lambda_mse * mse + self.lambda_ssim * (1.0 - ssim_)

    # ------------------------------------------------------------------ Head API
    @torch.no_grad()
    def prepare(
        self, train_features: list[torch.Tensor], fitted: FeatureStandardizer | None = None
    ) -> None:
        """Start the mixture means on embeddings of (up to 256) training images."""
        was_training = self.training
        self.eval()
        x = train_features[0][:256]
        tokens = torch.cat([self.embeddings(x[i : i + 32]) for i in range(0, x.shape[0], 32)])
        scored = F.layer_norm(tokens, (self.width,)).reshape(-1, self.width)
        self.mixture.init_from_data(scored, torch.Generator().manual_seed(self.seed))
        self.train(was_training)

    def input_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        t = self.terms(features)
        return self.combine(t["nll"].mean(), t["mse"].mean(), t["ssim"].mean())

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Anomaly map: the per-patch NLL ``[B, gh, gw]`` (the paper's; no decoder pass),
        or with ``anomaly_map="residual"`` the reconstruction error ``|x - recon|``
        averaged over channels, ``[B, H, W]``."""
        x = features[0]
        tokens = self.embeddings(x)
        if self.anomaly_map == "residual":
            return residual_map(self.reconstruct_from_tokens(tokens), x)
        return self.on_grid(self.patch_nll(tokens))

    def on_grid(self, nll: torch.Tensor) -> torch.Tensor:
        """Per-patch values ``[B, N]`` -> ``[B, gh, gw]``."""
        return nll.view(nll.shape[0], *self.grid)

    def image_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The training loss of each image, ``[B]`` (mean patch NLL + reconstruction terms)."""
        t = self.terms(features)
        return self.combine(t["nll"].mean(1), t["mse"], t["ssim"])

    def score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map and image score from one encoder (and decoder) pass."""
        t = self.terms(features)
        if self.anomaly_map == "residual":
            patch_map = residual_map(t["recon"], features[0])
        else:
            patch_map = self.on_grid(t["nll"])
        if self.image_score == "map_max":
            return patch_map, None
        return patch_map, self.combine(t["nll"].mean(1), t["mse"], t["ssim"])

    def image_scores(self, features: list[torch.Tensor]) -> torch.Tensor | None:
        """Image-level score ``[B]``, or None to let the model use the map maximum."""
        if self.image_score == "map_max":
            return None
        return self.image_loss(features)

    def score_candidates(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every image-score candidate built from the loss terms, each ``[B]``: the
        training loss (the paper's), its terms alone, and the loss with the patch NLL's
        maximum in place of its mean. With the map maximum (from ``AnomalyModel``) these
        are what ``benchmarks/`` compare to pick ``image_score``."""
        t = self.terms(features)
        nll_max = t["nll"].max(1).values
        return {
            "loss": self.combine(t["nll"].mean(1), t["mse"], t["ssim"]),
            "nll_mean": t["nll"].mean(1),
            "nll_max": nll_max,
            "mse": t["mse"],
            "one_minus_ssim": 1.0 - t["ssim"],
            "loss_nll_max": self.combine(nll_max, t["mse"], t["ssim"]),
        }

    def config(self) -> dict[str, Any]:
        return {"preset": self.preset, "seed": self.seed, **self.options}

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, grid={self.grid}, width={self.width}"


def residual_map(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction error ``|x - recon|`` averaged over channels, ``[B, H, W]``."""
    return (recon - x).abs().mean(1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(head: VTADLHead) -> dict[str, Any]:
    """Parameter counts per part (for docs and benchmarks)."""
    parts = {
        "encoder": head.encoder,
        "reduce": head.reduce,
        "decoder": head.decoder,
        "mixture": head.mixture,
    }
    out = {name: count_parameters(m) for name, m in parts.items()}
    out["total"] = count_parameters(head)
    out["grid"] = list(head.grid)
    out["decoder_seed"] = list(head.decoder.seed_shape)
    out["nll_lower_bound"] = math.log(head.options["min_std"]) + 0.5 * math.log(2 * math.pi)
    return out
