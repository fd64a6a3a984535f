"""Preprocessing: resizing, min-max statistics, config round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitqc.data.records import Sample
from vitqc.data.transforms import (
    MIN_RANGE,
    Preprocessor,
    iter_resized_batches,
    resize_batch,
    resize_tensor,
)
from vitqc.errors import VitqcError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_resize_batch_shape_range_and_dtype() -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(2)]
    x = resize_batch(imgs, (16, 12))
    assert x.shape == (2, 3, 16, 12) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_resize_batch_same_size_is_exact_and_mixed_sizes_work() -> None:
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    x = resize_batch([img], (4, 5))
    assert torch.equal(x[0], torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    big = np.full((8, 10, 3), 200, dtype=np.uint8)
    y = resize_batch([img, big], (4, 5))
    assert y.shape == (2, 3, 4, 5)
    assert torch.allclose(y[1], torch.full((3, 4, 5), 200 / 255))


def test_resize_batch_grayscale_becomes_three_identical_channels() -> None:
    gray = np.random.default_rng(1).integers(0, 256, (9, 9), dtype=np.uint8)
    x = resize_batch([gray], (6, 6))
    assert x.shape == (1, 3, 6, 6)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])


def test_resize_tensor_matches_resize_batch() -> None:
    img = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    x01 = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    assert torch.equal(resize_tensor(x01, (7, 9)), resize_batch([img], (7, 9)))


def test_fit_minmax_streams_per_channel_extremes() -> None:
    a = torch.full((2, 3, 4, 4), 0.5)
    a[0, 0, 0, 0] = 0.1  # channel 0 min in batch 1
    b = torch.full((1, 3, 4, 4), 0.5)
    b[0, 1, 2, 2] = 0.9  # channel 1 max in batch 2
    b[0, 2, 1, 1] = 0.2
    pre = Preprocessor((4, 4), MEAN, STD).fit_minmax(iter([a, b]))
    assert torch.allclose(pre.channel_min, torch.tensor([0.1, 0.5, 0.2]))
    assert torch.allclose(pre.channel_max, torch.tensor([0.5, 0.9, 0.5]))
    assert pre.minmax_fitted


def test_forward_is_minmax_then_mean_std() -> None:
    pre = Preprocessor((2, 2), MEAN, STD, channel_min=[0.2] * 3, channel_max=[0.6] * 3)
    x = torch.full((1, 3, 2, 2), 0.4)
    y = pre(x)
    expected = (0.5 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(y[0, :, 0, 0], expected)


def test_minmax_disabled_keeps_identity_and_ignores_fit() -> None:
    pre = Preprocessor((2, 2), MEAN, STD, minmax=False)
    pre.fit_minmax([torch.full((1, 3, 2, 2), 0.3)])
    assert torch.equal(pre.channel_min, torch.zeros(3))
    assert torch.equal(pre.channel_max, torch.ones(3))
    x = torch.rand(1, 3, 2, 2)
    assert torch.allclose(
        pre(x), (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    )


def test_constant_channel_range_is_clamped() -> None:
    pre = Preprocessor((2, 2), MEAN, STD).fit_minmax([torch.full((1, 3, 2, 2), 0.5)])
    y = pre(torch.full((1, 3, 2, 2), 0.5 + MIN_RANGE))
    assert torch.isfinite(y).all()
    assert torch.allclose(y[0, :, 0, 0], (1.0 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_fit_minmax_empty_split_is_an_error() -> None:
    with pytest.raises(VitqcError, match="no training images"):
        Preprocessor((2, 2), MEAN, STD).fit_minmax([])


def test_config_round_trip_and_fingerprint() -> None:
    pre = Preprocessor((8, 6), MEAN, STD).fit_minmax([torch.rand(2, 3, 8, 6)])
    cfg = json.loads(json.dumps(pre.config()))
    again = Preprocessor.from_config(cfg)
    assert again.config() == pre.config()
    assert again.fingerprint() == pre.fingerprint()
    for name in ("channel_min", "channel_max", "mean", "std"):
        assert torch.equal(getattr(again, name), getattr(pre, name))
    other = Preprocessor((8, 6), MEAN, STD)
    assert other.fingerprint() != pre.fingerprint()
    assert set(dict(pre.named_buffers())) == {"channel_min", "channel_max", "mean", "std"}


def test_iter_resized_batches_reads_samples() -> None:
    samples = [
        Sample(key=str(i), label=0, defect_type="good", array=np.full((5, 5), i * 40, np.uint8))
        for i in range(5)
    ]
    batches = list(iter_resized_batches(samples, (4, 4), batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    pre = Preprocessor((4, 4), MEAN, STD).fit_minmax(batches)
    assert torch.allclose(pre.channel_min, torch.zeros(3))
    assert torch.allclose(pre.channel_max, torch.full((3,), 160 / 255))
