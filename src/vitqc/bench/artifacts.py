"""Per-run curves and gallery images, stored beside the results database.

The HTML report must be buildable later without the models or the data, so the grid
keeps what the report draws: ROC / PR / PRO curves (downsampled to a few hundred points)
and anomaly-map overlays for a fixed selection of test images per category. Layout under
the artifacts folder (``<db stem>_artifacts/``)::

    runs/<cell key>/curves.json          curves + the gallery entries of this run
    runs/<cell key>/overlay_<i>.png      anomaly-map overlay of gallery image i
    categories/<dataset>__<category>/<i>_image.png, <i>_mask.png
                                         the gallery images and masks (shared by runs)

A run folder is written whole or not at all (temp folder + rename); the database row
that points to it is written after it, so a row never points to a missing folder.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitqc.atomic import atomic_dir, atomic_path
from vitqc.data.io import WHITE_LEVEL, load_image, read_mask
from vitqc.data.records import Sample

CURVES_FILE = "curves.json"
CURVE_POINTS = 300
THUMB_SIDE = 160


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def category_dir_name(dataset: str, category: str) -> str:
    return f"{safe_name(dataset)}__{safe_name(category)}"


def downsample_curve(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS) -> dict[str, list]:
    """At most ``n`` points, evenly spaced in index, keeping both ends (for drawing only)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size > n:
        idx = np.unique(np.linspace(0, x.size - 1, n).round().astype(int))
        x, y = x[idx], y[idx]
    return {"x": [round(float(v), 6) for v in x], "y": [round(float(v), 6) for v in y]}


def select_gallery(
    samples: Sequence[Sample], n_good: int = 2, n_defective: int = 3
) -> list[Sample]:
    """A fixed choice per category (same for every run): the first good images by key,
    then defective images taking each defect type in turn, so the gallery shows variety."""
    ordered = sorted(samples, key=lambda s: s.key)
    good = [s for s in ordered if not s.is_defective][:n_good]
    by_type: dict[str, list[Sample]] = {}
    for s in ordered:
        if s.is_defective:
            by_type.setdefault(s.defect_type, []).append(s)
    bad: list[Sample] = []
    depth = 0
    while len(bad) < n_defective and any(depth < len(v) for v in by_type.values()):
        for dt in sorted(by_type):
            if depth < len(by_type[dt]) and len(bad) < n_defective:
                bad.append(by_type[dt][depth])
        depth += 1
    return good + bad


def _thumb_size(shape: tuple[int, int], side: int = THUMB_SIDE) -> tuple[int, int]:
    h, w = shape
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    mode = "F" if array.dtype.kind == "f" else None
    img = Image.fromarray(array.astype(np.float32) if mode == "F" else array, mode=mode)
    return np.asarray(img.resize((size[1], size[0]), resample))


def _save(array: np.ndarray, path: Path) -> None:
    """Atomic PNG write: shared category images may be rewritten by every run."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG", optimize=True)


def _masks_at(samples: Sequence[Sample], shape: tuple[int, int]) -> list[np.ndarray | None]:
    """Ground truth resized (nearest) to the map resolution, for the drawn PRO curve."""
    out: list[np.ndarray | None] = []
    for s in samples:
        if s.mask_path is None:
            out.append(np.zeros(shape, dtype=bool) if not s.is_defective else None)
            continue
        mask = read_mask(s.mask_path)
        out.append(_resize(mask, shape, Image.NEAREST) > 127 if mask.shape != shape else mask)
    return out


def compute_curves(
    samples: Sequence[Sample], scores: np.ndarray, maps: np.ndarray | None
) -> dict[str, Any]:
    """ROC and PR from image scores; PRO (FPR <= 0.3) from maps at model resolution.

    The PRO curve here is for drawing; the AUPRO in the database comes from the
    evaluation at each mask's full resolution.
    """
    from vitqc.metrics import pr_curve_points, pro_curve, roc_curve_points

    labels = np.array([s.label for s in samples], dtype=np.int64)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if labels.size and 0 < labels.sum() < labels.size:
            fpr, tpr, _ = roc_curve_points(labels, scores)
            out["roc"] = downsample_curve(fpr, tpr)
            precision, recall, _ = pr_curve_points(labels, scores)
            out["pr"] = downsample_curve(recall, precision)
        if maps is not None and len(maps):
            masks = _masks_at(samples, tuple(maps.shape[1:]))
            if any(m is not None and m.any() for m in masks):
                fpr, pro = pro_curve(masks, list(maps), fpr_limit=0.3)
                if fpr.size:
                    out["pro"] = downsample_curve(fpr, pro)
    return out


def write_run_artifacts(
    root: Path,
    rel: str,
    *,
    dataset: str,
    category: str,
    samples: Sequence[Sample],
    scores: np.ndarray,
    maps: np.ndarray | None,
    model: Any,
    gallery: Sequence[Sample],
) -> None:
    """Curves and overlays of one run into ``root/rel`` (atomically)."""
    root = Path(root)
    curves = compute_curves(samples, scores, maps if maps is not None else None)
    index = {s.key: i for i, s in enumerate(samples)}
    cat_rel = f"categories/{category_dir_name(dataset, category)}"
    cat_dir = root / cat_rel
    cat_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    white = model.preprocessor.white_level if model is not None else WHITE_LEVEL
    with atomic_dir(root / rel) as tmp:
        for gi, sample in enumerate(gallery):
            image = load_image(sample, white)
            size = _thumb_size(image.shape[:2])
            thumb = _resize(image, size, Image.BILINEAR)
            image_rel = f"{cat_rel}/{gi}_image.png"
            mask_rel = f"{cat_rel}/{gi}_mask.png"
            _save(thumb, root / image_rel)
            mask_file: str | None = None
            if sample.mask_path is not None or not sample.is_defective:
                mask = _masks_at([sample], image.shape[:2])[0]
                if mask is not None:
                    _save(_resize(mask, size, Image.NEAREST), root / mask_rel)
                mask_file = mask_rel
            entry = {
                "key": sample.key,
                "label": int(sample.label),
                "defect_type": sample.defect_type,
                "image": image_rel,
                "mask": mask_file,
            }
            i = index.get(sample.key)
            if i is not None and maps is not None:
                from vitqc.report.figures import anomaly_overlay, heat_overlay

                raw = torch.from_numpy(np.asarray(maps[i], dtype=np.float32))
                norm = model.normalize(raw).numpy() if model is not None else raw.numpy()
                norm = _resize(norm.astype(np.float32), size, Image.BILINEAR)
                if model is not None and np.isfinite(float(model.threshold)):
                    thr = float(model.normalize(model.threshold.clone()))
                    overlay = anomaly_overlay(thumb, norm, thr)
                else:
                    overlay = heat_overlay(thumb, norm)
                _save(overlay, tmp / f"overlay_{gi}.png")
                entry["overlay"] = f"{rel}/overlay_{gi}.png"
                entry["score"] = float(scores[i])
            entries.append(entry)
        curves["gallery"] = entries
        if model is not None and hasattr(model, "threshold"):
            curves["threshold"] = float(model.threshold)
        (tmp / CURVES_FILE).write_text(json.dumps(curves) + "\n", encoding="utf-8")


def read_run_artifacts(root: Path, rel: str | None) -> dict[str, Any] | None:
    """The stored curves and gallery of a run, or None when they are missing or corrupt."""
    if not rel:
        return None
    path = Path(root) / rel / CURVES_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
