"""The per-image decision: threshold, and the minimum-area rule on hand-made maps."""

from __future__ import annotations

import numpy as np
import pytest

from vitqc.decision import decide, largest_region_area, parse_min_area, pixel_area
from vitqc.errors import VitqcError


def _map(*regions: tuple[slice, slice], shape=(8, 8), value=5.0) -> np.ndarray:
    out = np.zeros(shape)
    for rows, cols in regions:
        out[rows, cols] = value
    return out


def test_largest_region_is_eight_connected_and_strictly_above_the_threshold():
    m = _map((slice(0, 2), slice(0, 2)), (slice(5, 8), slice(5, 8)))  # 4 px and 9 px
    assert largest_region_area(m, 1.0) == 9
    # two diagonal pixels touch at a corner: one region of 2
    diag = np.zeros((4, 4))
    diag[0, 0] = diag[1, 1] = 3.0
    assert largest_region_area(diag, 1.0) == 2
    assert largest_region_area(m, 5.0) == 0  # equal to the threshold: not above
    assert largest_region_area(np.zeros((3, 3)), 0.5) == 0


def test_min_area_flags_one_large_region_not_scattered_specks():
    threshold = 1.0
    blob = _map((slice(2, 6), slice(2, 6)))  # one 16 px region
    specks = np.zeros((8, 8))
    specks[::2, ::2] = 5.0  # 16 isolated pixels: as many above, no region larger than 1
    faint = _map((slice(0, 8), slice(0, 8)), value=0.5)  # below the threshold everywhere
    maps = np.stack([blob, specks, faint])
    scores = maps.reshape(3, -1).max(1)
    plain, areas = decide(scores, maps, threshold)
    assert plain.tolist() == [True, True, False] and areas is None
    flagged, areas = decide(scores, maps, threshold, min_area=10)
    assert flagged.tolist() == [True, False, False]
    assert areas.tolist() == [16, 1, 0]
    # exactly the minimum counts; one more pixel does not
    assert decide(scores, maps, threshold, min_area=16)[0].tolist() == [True, False, False]
    assert decide(scores, maps, threshold, min_area=17)[0].tolist() == [False, False, False]


def test_areas_are_in_original_pixels():
    blob = _map((slice(2, 6), slice(2, 6)))  # 16 map pixels on an 8 x 8 map
    assert pixel_area((32, 16), (8, 8)) == 8.0
    flagged, areas = decide([5.0], [blob], 1.0, min_area=100, original_sizes=[(32, 16)])
    assert areas.tolist() == [128.0] and flagged.tolist() == [True]
    flagged, _ = decide([5.0], [blob], 1.0, min_area=100, original_sizes=[(8, 8)])
    assert flagged.tolist() == [False]


def test_the_area_rule_only_removes_flags():
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, size=(50, 16, 16))
    scores = rng.gamma(2.0, size=50) * 3  # any image score, not only the map maximum
    plain, _ = decide(scores, maps, 4.0)
    for area in (1, 3, 10):
        assert not (decide(scores, maps, 4.0, min_area=area)[0] & ~plain).any()


def test_parse_min_area():
    assert parse_min_area(None) == 0.0 and parse_min_area("0") == 0.0
    assert parse_min_area("50") == 50.0 and parse_min_area("12.5px") == 12.5
    assert parse_min_area("2.5mm2", mm_per_pixel=0.1) == pytest.approx(250.0)
    with pytest.raises(VitqcError, match="--mm-per-pixel"):
        parse_min_area("2.5mm2")
    with pytest.raises(VitqcError, match="--min-area"):
        parse_min_area("big")
    with pytest.raises(VitqcError, match="one anomaly map per image"):
        decide([1.0, 2.0], None, 0.5, min_area=3)
