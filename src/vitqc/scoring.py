"""From feature maps to anomaly maps and image scores, with calibration as buffers.

``AnomalyModel`` is a plain ``nn.Module`` (anomalib style): preprocessing, frozen
backbone, head and calibration values in one object that returns tensors. Training
loops and file handling live elsewhere. Every score is computed per image, so an
image scores the same whatever else shares its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from vitqc.backbones.extractor import micro_batches
from vitqc.calibration import Calibration
from vitqc.errors import VitqcError
from vitqc.heads.base import Head
from vitqc.resampling import resample


def maps_at_input_size(
    patch_maps: torch.Tensor, size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """Patch maps ``[B, h, w]`` -> maps ``[B, H, W]``: bilinear upsampling
    (``align_corners=False``), then a Gaussian blur of ``sigma`` px (radius
    ``ceil(4 sigma)``, edges replicated; ``sigma <= 0``: none), as one
    :func:`vitqc.resampling.resample`."""
    return resample(patch_maps, size, sigma)


def parse_image_score(name: str) -> float:
    """The fraction of the map an image score averages over: "max" -> 0, "mean" -> 1.

    How a map becomes an image score: "max" (the papers') suits small, local defects;
    "mean" suits diffuse ones (uneven texture, discoloration) and is steadier against a
    single hot pixel; "top:F" is the mean of the highest fraction F of the map, between
    the two. Heads with their own image score (VT-ADL's loss) ignore it.
    """
    if name == "max":
        return 0.0
    if name == "mean":
        return 1.0
    kind, _, value = name.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if kind != "top" or not 0 < fraction <= 1:
        raise VitqcError(
            f"image score {name!r}: use max, mean or top:F with 0 < F <= 1 (e.g. top:0.01)"
        )
    return fraction


def aggregate_maps(maps: torch.Tensor, image_score: str = "max") -> torch.Tensor:
    """Image scores ``[B]`` from maps ``[B, H, W]`` (each image on its own)."""
    fraction = parse_image_score(image_score)
    flat = maps.flatten(1)
    if fraction == 0:
        return flat.max(1).values
    if fraction == 1:
        return flat.mean(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


class AnomalyModel(nn.Module):
    """Preprocessor + frozen backbone + head; calibration travels as buffers.

    ``forward(x01)`` takes images resized to the backbone's input size with values in
    [0, 1] and returns ``(maps [B, H, W], image_scores [B])`` in raw head units; the
    image score aggregates the (smoothed) map (``image_score``, default its maximum).
    ``normalize_*`` map raw values with the validation-derived calibration.
    """

    def __init__(
        self,
        preprocessor: nn.Module,
        extractor: nn.Module,
        head: Head,
        smoothing_sigma: float = 4.0,
        image_score: str = "max",
    ) -> None:
        super().__init__()
        parse_image_score(image_score)
        self.image_score = image_score
        self.preprocessor = preprocessor
        self.extractor = extractor
        self.head = head
        self.smoothing_sigma = float(smoothing_sigma)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("map_low", torch.tensor(0.0))
        self.register_buffer("map_high", torch.tensor(1.0))
        #: the per-region rule (original pixels, 0: off; ``vitqc.decision``)
        self.register_buffer("min_area", torch.tensor(0.0))
        #: how the buffers above were fitted (rule, normal scores, FPR interval)
        self.calibration: Calibration | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.extractor.input_size)

    def features(self, x01: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features; the preprocessing runs in the extractor's micro-batches too
        (on a whole CPU batch of 32 it cost 10x more per image than at batch 1)."""
        with torch.inference_mode():
            parts = [self.extractor(self.preprocessor(x)) for x in micro_batches(x01)]
        return parts[0] if len(parts) == 1 else [torch.cat(f) for f in zip(*parts, strict=True)]

    def maps_from_features(
        self, features: list[torch.Tensor], from_inputs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head on (cached) features -> maps at input size and image scores
        (``from_inputs``: the features are already the head's ``fixed_inputs``)."""
        with torch.no_grad():
            if self.head.training:  # eval() visits every submodule (the flow's: 0.2 ms)
                self.head.eval()
            features = [f.float() for f in features]
            # a head may define its own image-level score (VT-ADL's loss terms);
            # otherwise (None) the image score aggregates the map
            if from_inputs:
                patch, scores = self.head.input_maps(features), None
            else:
                patch, scores = self.head.score(features)
            maps = maps_at_input_size(patch, self.input_size, self.smoothing_sigma)
        return maps, scores if scores is not None else aggregate_maps(maps, self.image_score)

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.maps_from_features([f.clone() for f in self.features(x01)])

    def set_calibration(self, calibration: Calibration) -> None:
        self.calibration = calibration
        self.threshold.fill_(float(calibration.threshold))
        self.map_low.fill_(float(calibration.map_low))
        self.map_high.fill_(float(calibration.map_high))
        self.min_area.fill_(float(calibration.min_area))

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """Raw scores to the calibrated range (validation-derived, not batch-derived)."""
        return (values - self.map_low) / (self.map_high - self.map_low).clamp_min(1e-12)
