"""Display scaling of anomaly maps: readable far above the threshold, outlined at it."""

from __future__ import annotations

import numpy as np

from vitqc.report.figures import anomaly_overlay, display_scale, threshold_contour


def test_display_scale_is_monotone_half_at_threshold_and_logarithmic_above():
    x = np.r_[-1.0, np.linspace(0, 2, 50), np.logspace(0.5, 5, 60)]
    y = display_scale(x, 2.0)
    assert (np.diff(y) > 0).all() or (np.diff(y[1:]) > 0).all()
    assert display_scale(np.array([2.0]), 2.0)[0] == 0.5
    assert y[0] == 0.0 and y.max() < 1.0
    # each decade above the threshold gets the same share of the colours
    steps = display_scale(2.0 + 2.0 * np.array([9.0, 99.0, 999.0]), 2.0)
    np.testing.assert_allclose(np.diff(steps), 0.1, atol=1e-9)
    assert display_scale(np.array([2.0 * 10**6]), 2.0)[0] == 1.0  # saturates past 1e5 x


def test_a_huge_defect_keeps_its_shape_on_screen():
    """A defect scoring 1e3-1e6 x the threshold: clipped linear colours are one flat
    patch; the display scale keeps its core apart from its rim."""
    yy, xx = np.mgrid[0:64, 0:64]
    dist = np.hypot(yy - 32, xx - 32)
    normalized = np.where(dist < 16, 20.0 * 10 ** (6 - 3 * dist / 16), 0.3)  # threshold 20
    shown = display_scale(normalized, 20.0)
    core, rim = shown[dist < 3], shown[(dist > 13) & (dist < 16)]
    assert core.min() - rim.max() > 0.1  # visibly different colours
    assert np.unique(np.round(shown[dist < 16], 2)).size > 5
    clipped = np.clip(normalized / 20.0, 0, 1)
    assert np.unique(clipped[dist < 16]).size == 1  # what the old linear overlay showed


def test_threshold_contour_outlines_the_regions_above_it():
    m = np.zeros((12, 12))
    m[3:7, 4:9] = 5.0
    outline = threshold_contour(m, 1.0)
    assert outline[3, 4:9].all() and outline[6, 4:9].all() and outline[3:7, 4].all()
    assert not outline[4:6, 5:8].any() and not outline[m <= 1.0].any()
    image = np.full((12, 12, 3), 90, dtype=np.uint8)
    overlay = anomaly_overlay(image, m, 1.0)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    assert (overlay[outline] == 255).all()
