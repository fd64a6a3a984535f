"""Image scores from anomaly maps: each image on its own, by a named aggregation."""

from __future__ import annotations

import pytest
import torch

from vitqc.errors import VitqcError
from vitqc.scoring import aggregate_maps, parse_image_score


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
