"""Feature cache: hits skip the backbone, any change of content or settings recomputes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitqc.backbones import FeatureExtractor, create_backbone
from vitqc.backbones.cache import FeatureCache, compute_features, default_cache_root
from vitqc.data.records import Sample
from vitqc.data.transforms import Preprocessor, resize_batch
from vitqc.errors import VitqcError

SIZE = 64  # small input: the cache logic does not depend on resolution


def _extractor(layers=(2, 3)) -> FeatureExtractor:
    return create_backbone(
        "tf_efficientnet_lite0", layers=layers, weights="random", image_size=SIZE
    )


class Counter:
    """Counts images that go through the backbone (forward hook)."""

    def __init__(self, ext: FeatureExtractor) -> None:
        ext.feature_shapes()  # the one-off dry run for shapes is not a feature computation
        self.images = 0
        ext.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.images += int(args[0].shape[0])


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(key=path.name, label=0, defect_type="good", path=path))
    return samples


@pytest.fixture()
def setup(tmp_path):
    ext = _extractor()
    pre = Preprocessor.for_backbone(ext)
    samples = _write_images(tmp_path, 5)
    return ext, pre, samples, FeatureCache(tmp_path / "cache")


def test_second_extract_is_served_from_disk(setup) -> None:
    ext, pre, samples, cache = setup
    counter = Counter(ext)
    first = cache.extract(ext, pre, samples, batch_size=2, progress=False)
    assert counter.images == 5
    assert [tuple(f.shape) for f in first] == [(5, 40, 8, 8), (5, 112, 4, 4)]
    second = cache.extract(ext, pre, samples, batch_size=2, progress=False)
    assert counter.images == 5  # no backbone call
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    folder = cache.settings_dir(ext, pre)
    assert (folder / "settings.json").is_file()
    assert len(list(folder.glob("*/*.safetensors"))) == 5


def test_cached_features_equal_fresh_features_in_sample_order(setup) -> None:
    ext, pre, samples, cache = setup
    cache.extract(ext, pre, samples[:3], progress=False)  # warm part of the cache
    order = [samples[4], samples[0], samples[2], samples[1], samples[3]]
    cached = cache.extract(ext, pre, order, batch_size=3, progress=False)
    x01 = resize_batch([np.asarray(Image.open(s.path)) for s in order], ext.input_size)
    fresh = compute_features(ext, pre, x01)
    for a, b in zip(cached, fresh, strict=True):
        # the same images in batches of 3 against one of 5: with more than one thread
        # the convolutions may sum in another order (measured: 5.8e-6 at two threads)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_changed_image_bytes_are_recomputed(setup) -> None:
    ext, pre, samples, cache = setup
    before = cache.extract(ext, pre, samples, progress=False)
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(samples[1].path)  # same path
    counter = Counter(ext)
    after = cache.extract(ext, pre, samples, progress=False)
    assert counter.images == 1
    assert not torch.equal(before[0][1], after[0][1])
    assert torch.equal(before[0][0], after[0][0])


def test_changed_layers_or_minmax_are_recomputed(setup) -> None:
    ext, pre, samples, cache = setup
    cache.extract(ext, pre, samples, progress=False)

    other = _extractor(layers=(3,))
    counter = Counter(other)
    out = cache.extract(other, pre, samples, progress=False)
    assert counter.images == 5 and [tuple(f.shape[1:]) for f in out] == [(112, 4, 4)]

    counter = Counter(ext)
    refit = Preprocessor.for_backbone(ext).fit_minmax([torch.rand(2, 3, SIZE, SIZE) * 0.5])
    cache.extract(ext, refit, samples, progress=False)
    assert counter.images == 5
    assert cache.settings_dir(ext, refit) != cache.settings_dir(ext, pre)


def test_in_memory_samples_duplicates_and_corrupt_entries(tmp_path) -> None:
    ext = _extractor()
    pre = Preprocessor.for_backbone(ext)
    cache = FeatureCache(tmp_path)
    gray = np.arange(30 * 30, dtype=np.uint8).reshape(30, 30)
    samples = [
        Sample(key="0", label=0, defect_type="good", array=gray),
        Sample(key="1", label=0, defect_type="good", array=gray.copy()),  # same content
        Sample(key="2", label=0, defect_type="good", array=255 - gray),
    ]
    counter = Counter(ext)
    out = cache.extract(ext, pre, samples, progress=False)
    assert counter.images == 2 and torch.equal(out[0][0], out[0][1])
    for entry in (tmp_path).glob("*/*/*.safetensors"):
        entry.write_bytes(b"garbage")
    again = cache.extract(ext, pre, samples, progress=False)
    assert counter.images == 4
    assert torch.equal(again[1], out[1])


def test_errors_and_defaults(tmp_path, monkeypatch, setup) -> None:
    ext, pre, samples, cache = setup
    with pytest.raises(VitqcError, match="input size"):
        cache.extract(ext, Preprocessor((32, 32), ext.mean, ext.std), samples, progress=False)
    missing = Sample(key="x", label=0, defect_type="good", path=tmp_path / "gone.png")
    with pytest.raises(VitqcError, match="gone.png"):
        cache.extract(ext, pre, [missing], progress=False)
    assert [tuple(f.shape) for f in cache.extract(ext, pre, [], progress=False)] == [
        (0, 40, 8, 8),
        (0, 112, 4, 4),
    ]
    monkeypatch.setenv("VITQC_CACHE", str(tmp_path / "env"))
    assert default_cache_root() == tmp_path / "env"
    assert FeatureCache().root == tmp_path / "env"
