"""``vitqc inspect``: open every image and mask once, before any training, and say what is wrong.

Training reads images lazily, so a corrupt file or a mask of the wrong size would otherwise
surface minutes into a run (or silently skew pixel metrics). The report is a plain dict
(JSON-ready); ``format_inspection`` renders it for the terminal.

Report shape::

    {"root", "format" ("mixed" when categories differ), "categories": [names],
     "per_category": {name: {...}}, "problems": [str], "ok": bool}

Per category: ``counts`` (``train_good`` and the ``train``/``val`` sizes of the seeded split,
``test_good``, ``test_defective`` per defect type and its total), ``defects`` (per type: count
and masks found/missing/empty), ``image_sizes``, ``masks_found``, ``masks_missing`` /
``masks_empty`` (image keys), ``orphan_masks``, ``unreadable`` ({file, error}),
``size_mismatches`` ({file, mask_size, image_size}, sizes as [width, height]), ``notes``,
``training_copies`` ({file, copy_of}: training images with the pixels of an earlier one)
and ``lookalikes`` ({max_distance, hash_bits, test_good, test_defective}: per test image
that looks like a training image, {test, train, distance, identical}, and the defective
ones' ``mask``; ``lookalike``).
``ok`` is False when a file is unreadable, a mask's size differs from its image, a training
set is empty or a category cannot be scanned; missing or empty masks are warnings only
(an empty mask on a defective image is valid: it counts for image metrics).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitqc.data.io import read_image, read_mask, white_level_for
from vitqc.data.layouts import (
    _detect_here,
    _looks_like,
    _require_dir,
    _subfolders,
    detect_format,
    list_categories,
    load_mnist_arrays,
    resolve_category,
    scan_category,
)
from vitqc.data.lookalike import (
    HASH_BITS,
    MAX_DISTANCE,
    nearest_lookalikes,
    perceptual_hash,
    pixel_digest,
)
from vitqc.data.records import Sample
from vitqc.data.split import split_train_val
from vitqc.errors import VitqcError

_MAX_DISTINCT_SIZES = 10


def _targets(root: Path, format: str, category: str | None) -> list[tuple[Path, str, str]]:
    """``(folder, category name, format)`` for every category to inspect."""
    if category is not None:
        return [resolve_category(root, format, category)]
    fmt = str(format).lower()
    if fmt == "auto":
        here = _detect_here(root)
        if here is not None:
            return [(root, root.name, here)]
        found = [(sub, sub.name, _detect_here(sub)) for sub in _subfolders(root)]
        targets = [(p, n, f) for p, n, f in found if f is not None]
        if targets:
            return targets
        fmt = detect_format(root)  # raises the "cannot detect" error
    cats = list_categories(root, fmt)
    if not cats or _looks_like(root, fmt):
        return [(root, root.name, fmt)]
    return [(root / c, c, fmt) for c in cats]


def _size_summary(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {"n_distinct": 0, "distinct": []}
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    distinct = sorted(set(sizes))
    return {
        "min_width": min(widths),
        "max_width": max(widths),
        "min_height": min(heights),
        "max_height": max(heights),
        "n_distinct": len(distinct),
        "distinct": [list(s) for s in distinct] if len(distinct) <= _MAX_DISTINCT_SIZES else None,
    }


@dataclass
class _Pictures:
    """What inspection keeps of each readable image: hash and pixel digest by key."""

    hashes: dict[str, np.ndarray] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, image: np.ndarray) -> None:
        self.hashes[key] = perceptual_hash(image)
        self.digests[key] = pixel_digest(image)

    def training_copies(self, train: list[str]) -> list[dict[str, str]]:
        """Training images whose pixels equal an earlier training image's."""
        first: dict[str, str] = {}
        copies = []
        for key in train:
            digest = self.digests[key]
            if digest in first:
                copies.append({"file": key, "copy_of": first[digest]})
            else:
                first[digest] = key
        return copies

    def lookalikes(self, tests: list[str], train: list[str], max_distance: int) -> list[dict]:
        """Per test image that looks like a training image, its nearest one."""
        if not tests or not train:
            return []
        found = nearest_lookalikes(
            np.stack([self.hashes[k] for k in tests]),
            np.stack([self.hashes[k] for k in train]),
            max_distance,
        )
        return [
            {
                "test": tests[f.query],
                "train": train[f.reference],
                "distance": f.distance,
                "identical": self.digests[tests[f.query]] == self.digests[train[f.reference]],
            }
            for f in found
        ]


def _lookalike_problems(rep: dict[str, Any], counts: dict[str, Any]) -> list[str]:
    looks = rep["lookalikes"]
    within = f"hashes within {looks['max_distance']} of {looks['hash_bits']} bits"
    problems = []
    if looks["test_defective"]:
        e = looks["test_defective"][0]
        problems.append(
            f"warning: {len(looks['test_defective'])} of {counts['test_defective_total']} "
            f"defective test images look like good training images (the same part? {within}), "
            f"e.g. {e['test']} and {e['train']} ({e['distance']} bits): if a training image "
            "shows the defect, models learn it as normal; review them"
        )
    # good test images like training ones are listed, not warned of: parts of one kind
    # photographed alike (an aligned object) can be as close as one part photographed twice
    if rep["training_copies"]:
        e = rep["training_copies"][0]
        problems.append(
            f"warning: {len(rep['training_copies'])} training images are copies of others "
            f"(the same pixels), e.g. {e['file']} of {e['copy_of']}: each copy weighs twice"
        )
    return problems


def _inspect_files(
    cat_dir: Path, fmt: str, val_fraction: float, seed: int, white: int, lookalike: int
) -> dict[str, Any]:
    scan = scan_category(cat_dir, fmt)
    rep: dict[str, Any] = {"path": str(cat_dir), "format": fmt}
    counts: dict[str, Any] = {"train_good": len(scan.train_good), "train": 0, "val": 0}
    if scan.train_good:
        train, val = split_train_val(scan.train_good, val_fraction, seed)
        counts["train"], counts["val"] = len(train), len(val)
    test_good = [s for s in scan.test if s.label == 0]
    defective = [s for s in scan.test if s.label == 1]
    per_type = Counter(s.defect_type for s in defective)
    counts["test_good"] = len(test_good)
    counts["test_defective"] = dict(sorted(per_type.items()))
    counts["test_defective_total"] = len(defective)
    rep["counts"] = counts

    unreadable: list[dict[str, str]] = []
    image_sizes: dict[str, tuple[int, int]] = {}
    pictures = _Pictures()
    for sample in [*scan.train_good, *scan.test]:
        assert sample.path is not None
        try:
            img = read_image(sample.path, white)
        except VitqcError as exc:
            unreadable.append({"file": str(sample.path), "error": str(exc)})
            continue
        image_sizes[sample.key] = (int(img.shape[1]), int(img.shape[0]))
        pictures.add(sample.key, img)

    defects = {
        t: {"count": n, "masks_found": 0, "masks_missing": 0, "masks_empty": 0}
        for t, n in sorted(per_type.items())
    }
    missing: list[str] = []
    empty: list[str] = []
    mismatches: list[dict[str, Any]] = []
    found = 0
    for sample in defective:
        entry = defects[sample.defect_type]
        if sample.mask_path is None:
            missing.append(sample.key)
            entry["masks_missing"] += 1
            continue
        found += 1
        entry["masks_found"] += 1
        try:
            mask = read_mask(sample.mask_path)
        except VitqcError as exc:
            unreadable.append({"file": str(sample.mask_path), "error": str(exc)})
            continue
        if not mask.any():
            empty.append(sample.key)
            entry["masks_empty"] += 1
        mask_size = (int(mask.shape[1]), int(mask.shape[0]))
        img_size = image_sizes.get(sample.key)
        if img_size is not None and img_size != mask_size:
            mismatches.append(
                {
                    "file": str(sample.mask_path),
                    "mask_size": list(mask_size),
                    "image_size": list(img_size),
                }
            )

    rep["defects"] = defects
    rep["image_sizes"] = _size_summary(list(image_sizes.values()))
    rep["masks_found"] = found
    rep["masks_missing"] = missing
    rep["masks_empty"] = empty
    rep["orphan_masks"] = scan.orphan_masks
    rep["unreadable"] = unreadable
    rep["size_mismatches"] = mismatches
    rep["notes"] = list(scan.notes)
    train_keys = [s.key for s in scan.train_good if s.key in pictures.hashes]
    rep["training_copies"] = pictures.training_copies(train_keys)
    rep["lookalikes"] = {"max_distance": lookalike, "hash_bits": HASH_BITS}
    for name, group in (("test_good", test_good), ("test_defective", defective)):
        keys = [s.key for s in group if s.key in pictures.hashes]
        rep["lookalikes"][name] = pictures.lookalikes(keys, train_keys, lookalike)
    masks = {s.key: s.mask_path for s in defective}
    for pair in rep["lookalikes"]["test_defective"]:
        mask = masks[pair["test"]]
        pair["mask"] = mask.relative_to(cat_dir).as_posix() if mask is not None else None

    problems: list[str] = []
    fatal = False
    if not scan.train_good:
        problems.append(f"empty training set: no good images found in {scan.train_dir}")
        fatal = True
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable files, e.g. {unreadable[0]['error']}")
        fatal = True
    if mismatches:
        m = mismatches[0]
        (mw, mh), (iw, ih) = m["mask_size"], m["image_size"]
        problems.append(
            f"{len(mismatches)} masks differ in size from their image, e.g. {m['file']} "
            f"(mask {mw}x{mh}, image {iw}x{ih})"
        )
        fatal = True
    if missing:
        problems.append(
            f"warning: {len(missing)} defective images have no mask (image metrics only), "
            f"e.g. {missing[0]}"
        )
    if empty:
        problems.append(
            f"warning: {len(empty)} defective images have an empty mask (valid; no defect "
            f"pixels), e.g. {empty[0]}"
        )
    if scan.orphan_masks:
        problems.append(
            f"warning: {len(scan.orphan_masks)} mask files match no test image, "
            f"e.g. {scan.orphan_masks[0]}"
        )
    problems.extend(f"warning: {n}" for n in scan.notes if "ignored" in n)
    problems.extend(_lookalike_problems(rep, counts))
    rep["_problems"], rep["_fatal"] = problems, fatal
    return rep


def _inspect_mnist(cat_dir: Path, val_fraction: float, seed: int) -> dict[str, Any]:
    rep: dict[str, Any] = {"path": str(cat_dir), "format": "mnist"}
    arrays = load_mnist_arrays(cat_dir)
    counts: dict[str, Any] = {}
    sizes: list[tuple[int, int]] = []
    for part, (images, labels, source) in arrays.items():
        counts[f"{part}_per_digit"] = {
            str(d): int(n) for d, n in enumerate(np.bincount(labels, minlength=10)[:10])
        }
        counts[f"{part}_file"] = str(source)
        sizes.append((int(images.shape[2]), int(images.shape[1])))
    split: dict[str, dict[str, int]] = {}
    for d, n in counts["train_per_digit"].items():
        if n:
            fake = [Sample(str(i), 0, "good") for i in range(n)]
            train, val = split_train_val(fake, val_fraction, seed)
            split[d] = {"train": len(train), "val": len(val)}
        else:
            split[d] = {"train": 0, "val": 0}
    counts["split_per_normal_digit"] = split
    counts["test_total"] = int(sum(counts["test_per_digit"].values()))
    rep["counts"] = counts
    rep["image_sizes"] = _size_summary(sizes)
    rep.update(masks_found=0, masks_missing=[], masks_empty=[], orphan_masks=[])
    rep.update(unreadable=[], size_mismatches=[], notes=["no masks: image metrics only"])
    empty = [d for d, n in counts["train_per_digit"].items() if n == 0]
    rep["_problems"] = [f"no training images for digit(s) {', '.join(empty)}"] if empty else []
    rep["_fatal"] = bool(empty)
    return rep


def inspect_dataset(
    root: str | Path,
    format: str = "auto",
    category: str | None = None,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    bit_depth: int = 8,
    lookalike: int = MAX_DISTANCE,
) -> dict[str, Any]:
    """Open every image and mask of ``root`` (all categories unless ``category``) and report
    (images of more than 8 bits read as ``bit_depth``'s: ``io.image_array``). Test images
    whose perceptual hash lies within ``lookalike`` bits of a training image's are listed
    as the same part (``data.lookalike``)."""
    white = white_level_for(bit_depth)
    if not 0 <= lookalike <= HASH_BITS:
        raise VitqcError(f"--lookalike must be 0 to {HASH_BITS} bits, got {lookalike}")
    root = _require_dir(root)
    targets = _targets(root, format, category)
    per_category: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    ok = True
    for cat_dir, name, fmt in targets:
        try:
            if fmt == "mnist":
                rep = _inspect_mnist(cat_dir, val_fraction, seed)
            else:
                rep = _inspect_files(cat_dir, fmt, val_fraction, seed, white, lookalike)
        except VitqcError as exc:
            rep = {"path": str(cat_dir), "format": fmt, "error": str(exc)}
            rep.update(_problems=[str(exc)], _fatal=True)
        problems.extend(f"{name}: {p}" for p in rep.pop("_problems"))
        ok = ok and not rep.pop("_fatal")
        per_category[name] = rep
    formats = sorted({fmt for _, _, fmt in targets})
    return {
        "root": str(root),
        "format": formats[0] if len(formats) == 1 else "mixed",
        "categories": [name for _, name, _ in targets],
        "per_category": per_category,
        "problems": problems,
        "ok": ok,
    }


# --------------------------------------------------------------------------- rendering


def _sizes_text(sizes: dict[str, Any]) -> str:
    if not sizes.get("n_distinct"):
        return "-"
    if sizes.get("distinct") and len(sizes["distinct"]) <= 3:
        return ", ".join(f"{w}x{h}" for w, h in sizes["distinct"])
    return (
        f"{sizes['min_width']}-{sizes['max_width']}x{sizes['min_height']}-{sizes['max_height']}"
        f" ({sizes['n_distinct']} distinct)"
    )


def _short_list(items: list[Any], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _pair_text(pair: dict[str, Any]) -> str:
    how = "identical" if pair["identical"] else f"{pair['distance']} bits"
    return f"{pair['test']} ~ {pair['train']} ({how})"


def format_inspection(report: dict[str, Any], width: int = 100) -> str:
    """Render an ``inspect_dataset`` report as terminal text (tables, then problems)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    status = "OK" if report["ok"] else "PROBLEMS FOUND"
    console.print(
        f"Dataset {report['root']}  format: {report['format']}  status: {status}",
        markup=False,
        highlight=False,
    )

    file_cats = {n: r for n, r in report["per_category"].items() if "defects" in r}
    if file_cats:
        table = Table(
            title="Categories",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        table.add_column("category", overflow="fold")
        for col in (
            "train\ngood",
            "train",
            "val",
            "test\ngood",
            "defec-\ntive",
            "masks",
            "mask\nmissing",
            "mask\nempty",
            "unread-\nable",
            "size\nmismatch",
        ):
            table.add_column(col, justify="right")
        for name, r in file_cats.items():
            c = r["counts"]
            table.add_row(
                name,
                *(
                    str(v)
                    for v in (
                        c["train_good"],
                        c["train"],
                        c["val"],
                        c["test_good"],
                        c["test_defective_total"],
                        r["masks_found"],
                        len(r["masks_missing"]),
                        len(r["masks_empty"]),
                        len(r["unreadable"]),
                        len(r["size_mismatches"]),
                    )
                ),
            )
        console.print(table)
        dtable = Table(title="Defect types", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("category", "defect type", "images", "masks found", "missing", "empty"):
            dtable.add_column(col)
        for name, r in file_cats.items():
            for t, d in r["defects"].items():
                dtable.add_row(
                    name,
                    t,
                    str(d["count"]),
                    str(d["masks_found"]),
                    str(d["masks_missing"]),
                    str(d["masks_empty"]),
                )
        if dtable.row_count:
            console.print(dtable)

    for name, r in report["per_category"].items():
        if r.get("format") != "mnist" or "counts" not in r:
            continue
        c = r["counts"]
        mtable = Table(
            title=f"{name} (MNIST one-class, 28x28, no masks)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for col in ("digit", "training digits", "train/val when normal", "test digits"):
            mtable.add_column(col)
        for d in sorted(c["train_per_digit"]):
            s = c["split_per_normal_digit"][d]
            mtable.add_row(
                d,
                str(c["train_per_digit"][d]),
                f"{s['train']}/{s['val']}",
                str(c["test_per_digit"].get(d, 0)),
            )
        console.print(mtable)

    for name, r in report["per_category"].items():
        details = []
        if r.get("image_sizes") and r.get("format") != "mnist":
            details.append(f"image sizes (WxH): {_sizes_text(r['image_sizes'])}")
        if r.get("error"):
            details.append(f"error: {r['error']}")
        if r.get("unreadable"):
            details.append("unreadable: " + _short_list([u["file"] for u in r["unreadable"]]))
        if r.get("size_mismatches"):
            details.append(
                "size mismatches: "
                + _short_list(
                    [
                        f"{m['file']} ({m['mask_size'][0]}x{m['mask_size'][1]} vs "
                        f"{m['image_size'][0]}x{m['image_size'][1]})"
                        for m in r["size_mismatches"]
                    ],
                    limit=4,
                )
            )
        if r.get("masks_missing"):
            details.append("masks missing: " + _short_list(r["masks_missing"]))
        if r.get("masks_empty"):
            details.append("empty masks: " + _short_list(r["masks_empty"]))
        if r.get("orphan_masks"):
            details.append("masks without an image: " + _short_list(r["orphan_masks"]))
        looks = r.get("lookalikes", {})
        if looks.get("test_defective"):
            details.append(
                "defective test images that look like good training images (does the training "
                "image show the defect?): "
                + _short_list([_pair_text(p) for p in looks["test_defective"]], limit=4)
            )
        if looks.get("test_good"):
            details.append(
                f"{len(looks['test_good'])} of {r['counts']['test_good']} good test images look "
                "like training images (if the same parts, test figures are optimistic): "
                + _short_list([_pair_text(p) for p in looks["test_good"]], limit=4)
            )
        if r.get("training_copies"):
            details.append(
                "training copies: "
                + _short_list([f"{c['file']} = {c['copy_of']}" for c in r["training_copies"]], 4)
            )
        details.extend(f"note: {n}" for n in r.get("notes", []))
        if details:
            console.print(f"{name}:")
            for line in details:
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)

    if report["problems"]:
        console.print("Problems:")
        for p in report["problems"]:
            console.print(f"  - {p}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("No problems found.")
    return console.export_text()


def write_lookalike_figures(
    report: dict[str, Any], out: str | Path, bit_depth: int = 8
) -> list[Path]:
    """One PNG per defective test image that looks like a good training image (the two
    side by side, ``figures.save_lookalike_panel``), under ``out/<category>/``."""
    from vitqc.report.figures import save_lookalike_panel

    white = white_level_for(bit_depth)
    written = []
    for name, rep in report["per_category"].items():
        root = Path(rep["path"])
        for pair in rep.get("lookalikes", {}).get("test_defective", []):
            mask = read_mask(root / pair["mask"]) if pair["mask"] else None
            path = Path(out) / name / (pair["test"].replace("/", "__").rsplit(".", 1)[0] + ".png")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise VitqcError(f"cannot write the figures to {path.parent}: {exc}") from exc
            how = (
                "identical pixels" if pair["identical"] else f"hashes {pair['distance']} bits apart"
            )
            save_lookalike_panel(
                path,
                read_image(root / pair["test"], white),
                mask,
                read_image(root / pair["train"], white),
                f"{name}: {pair['test']} and {pair['train']} ({how} of {HASH_BITS})\n"
                "does the training image show the defect?",
            )
            written.append(path)
    return written
