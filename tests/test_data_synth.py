"""The synthetic MVTec-layout generator: determinism, layout, and masks that match defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitqc.data.io import load_image, load_mask
from vitqc.data.layouts import detect_format, load_dataset
from vitqc.data.synth import (
    DEFECT_TYPES,
    MIN_DELTA,
    add_defect,
    generate_synthetic,
    make_material,
    make_surface,
)
from vitqc.errors import VitqcError

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defective": 5, "size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic(tmp_path / "c", seed=4, **SMALL)
    assert a == tmp_path / "a" / "tile"
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert len(files_a) == 4 + 2 + 5 + 5
    assert files_a == files_b
    assert files_a.keys() == files_c.keys() and files_a != files_c


def test_layout_loads_with_matching_masks(tmp_path: Path) -> None:
    cat = generate_synthetic(tmp_path, category="plate", **SMALL)
    assert detect_format(cat) == "mvtec"
    ds = load_dataset(tmp_path)  # the single category is picked without --category
    assert (ds.category, ds.format, ds.has_masks) == ("plate", "mvtec", True)
    assert (len(ds.train), len(ds.val)) == (3, 1)
    assert ds.defect_types == sorted(DEFECT_TYPES)
    for sample in ds.test:
        image = load_image(sample)
        assert image.shape == (64, 64, 3)
        mask = load_mask(sample, image.shape[:2])
        assert mask is not None and mask.shape == (64, 64)
        assert mask.any() == sample.is_defective
        if sample.is_defective:
            raw = np.asarray(Image.open(sample.mask_path))
            assert raw.dtype == np.uint8 and set(np.unique(raw)) <= {0, 255}
    goods = [load_image(s) for s in ds.train + ds.val]
    assert not np.array_equal(goods[0], goods[1])


def test_rerun_replaces_whole_category(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, **SMALL)
    (tmp_path / "tile" / "stray.txt").write_text("left over")
    generate_synthetic(tmp_path, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile"]
    assert not (tmp_path / "tile" / "stray.txt").exists()


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defect_pixels_are_exactly_the_mask(kind: str) -> None:
    material = make_material(128, seed=1)
    for i in range(3):
        rng = np.random.default_rng([1, i])
        good = make_surface(material, rng)
        bad, mask = add_defect(good, kind, rng)
        assert mask.shape == good.shape[:2] and mask.dtype == bool
        assert 0 < mask.mean() < 0.05
        change = np.abs(bad.astype(int) - good.astype(int)).max(axis=2)
        assert (change[~mask] == 0).all()
        assert change[mask].min() >= MIN_DELTA


def test_mean_intensity_does_not_separate_defects(tmp_path: Path) -> None:
    material = make_material(96, seed=0)
    good = [make_surface(material, np.random.default_rng([0, 1, i])).mean() for i in range(20)]
    bad = []
    for i in range(20):
        rng = np.random.default_rng([0, 3, i])
        image, _ = add_defect(make_surface(material, rng), DEFECT_TYPES[i % 5], rng)
        bad.append(image.mean())
    wins = sum((b > g) + 0.5 * (b == g) for b in bad for g in good)
    auroc = wins / (len(good) * len(bad))
    assert 0.2 < auroc < 0.8


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(VitqcError, match="size"):
        generate_synthetic(tmp_path, size=16)
    with pytest.raises(VitqcError, match="at least 2 training images"):
        generate_synthetic(tmp_path, n_train=1)
    with pytest.raises(VitqcError, match="unknown synthetic defect"):
        add_defect(np.zeros((64, 64, 3), np.uint8), "dust", np.random.default_rng(0))
