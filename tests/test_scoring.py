"""From patch maps to maps at input size and image scores: each image on its own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitqc.errors import VitqcError
from vitqc.heads import create_head
from vitqc.scoring import AnomalyModel, aggregate_maps, maps_at_input_size, parse_image_score


def test_aggregations_by_hand():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 9.0  # one hot pixel
    maps[1] += 1.0  # diffuse: everything a little high
    assert aggregate_maps(maps, "max").tolist() == [9.0, 1.0]
    assert aggregate_maps(maps, "mean").tolist() == pytest.approx([0.09, 1.0])
    # top 2 % of 100 pixels = the 2 highest
    assert aggregate_maps(maps, "top:0.02").tolist() == pytest.approx([4.5, 1.0])
    assert aggregate_maps(maps, "top:1").tolist() == pytest.approx([0.09, 1.0])


def test_aggregation_is_per_image():
    maps = torch.rand(5, 8, 8)
    for name in ("max", "mean", "top:0.1"):
        together = aggregate_maps(maps, name)
        alone = torch.cat([aggregate_maps(maps[i : i + 1], name) for i in range(5)])
        assert torch.equal(together, alone)


@pytest.mark.parametrize("bad", ["median", "top:0", "top:1.5", "top:x", "top"])
def test_bad_image_score_names(bad):
    with pytest.raises(VitqcError, match="image score"):
        parse_image_score(bad)


def _upsample_then_blur(patch, size, sigma):
    """The two steps as written out: bilinear upsampling, then a separable Gaussian
    convolution over an edge-replicated border."""
    maps = patch
    if tuple(patch.shape[-2:]) != tuple(size):
        maps = F.interpolate(patch[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if sigma <= 0:
        return maps
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    out = F.pad(maps[:, None], (radius,) * 4, mode="replicate")
    out = F.conv2d(F.conv2d(out, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return out[:, 0]


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [
        ((28, 28), (224, 224), 4.0),
        ((16, 20), (224, 280), 2.5),
        ((14, 14), (14, 14), 0.0),
        ((32, 32), (448, 448), 4.0),
        ((8, 8), (8, 8), 1.0),
    ],
)
def test_maps_at_input_size_is_upsampling_then_blur(grid, size, sigma):
    patch = torch.rand(3, *grid, generator=torch.Generator().manual_seed(0)) * 50
    with torch.inference_mode():  # as at inference; the cached matrices must stay usable
        maps = maps_at_input_size(patch, size, sigma)
    assert maps.shape == (3, *size)
    torch.testing.assert_close(maps, _upsample_then_blur(patch, size, sigma), rtol=0, atol=1e-4)
    # outside inference mode too, and each image as if alone in its batch
    alone = torch.cat([maps_at_input_size(patch[i : i + 1], size, sigma) for i in range(3)])
    torch.testing.assert_close(alone, maps, rtol=0, atol=1e-5)
    if sigma > 0:  # the blur keeps a constant map constant, border included
        flat = maps_at_input_size(torch.full((1, *grid), 7.0), size, sigma)
        torch.testing.assert_close(flat, torch.full((1, *size), 7.0))


def test_maps_from_features_scores_a_head_in_eval_mode():
    """A head left in training mode (after a training step) is put in eval mode, with
    every submodule, before it scores; the maps are those of the head in eval mode."""

    class Features(nn.Module):  # what the extractor hands over: the features themselves
        input_size = (16, 16)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x]

    g = torch.Generator().manual_seed(0)
    features = [torch.randn(6, 4, 4, 4, generator=g)]
    head = create_head("flow", [4], [(4, 4)], steps=2, hidden_ratio=1.0, min_hidden=4)
    head.prepare(features)
    model = AnomalyModel(nn.Identity(), Features(), head, smoothing_sigma=1.0)
    head.eval()
    expected, _ = model.maps_from_features(features)
    head.train()
    maps, _ = model.maps_from_features(features)
    assert not any(m.training for m in head.modules())
    torch.testing.assert_close(maps, expected)
