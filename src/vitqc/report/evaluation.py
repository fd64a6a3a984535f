"""Metrics of a model on the test split: a JSON-able dict, its JSON file and a terminal table.

The threshold comes from :mod:`vitqc.calibration` (validation only); the test split is only
used to report. Pixel metrics are computed at each mask's original resolution, with the
model-resolution maps resized bilinearly to it (MVTec AD's official protocol).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitqc.atomic import write_json
from vitqc.calibration import INTERVAL_LEVEL, Calibration
from vitqc.data.io import displayed_size, load_image, load_mask
from vitqc.data.records import Sample
from vitqc.errors import VitqcError
from vitqc.metrics import (
    aupro,
    decision_f1_precision_recall,
    f1_precision_recall,
    image_auroc,
    image_prauc,
    pixel_auroc,
    resize_map,
)

__all__ = ["evaluate_predictions", "format_metrics_table", "write_metrics_json"]

THRESHOLD_SPACE = "raw image score (max of the raw anomaly map); flagged if score > threshold"


def original_shape(sample: Sample) -> tuple[int, int]:
    """(H, W) of the sample's image, read from the file header without decoding pixels."""
    if sample.array is not None:
        return tuple(np.asarray(sample.array).shape[:2])  # type: ignore[return-value]
    if sample.path is None:
        return load_image(sample).shape[:2]  # raises the one-line error
    try:
        with Image.open(sample.path) as img:
            width, height = displayed_size(img)
    except FileNotFoundError as exc:
        raise VitqcError(f"image not found: {sample.path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VitqcError(f"cannot read image {sample.path}: not a valid image file") from exc
    return height, width


def _num(x: float) -> float | None:
    """nan (an undefined metric) becomes None, i.e. JSON null."""
    x = float(x)
    return None if math.isnan(x) else x


def evaluate_predictions(
    samples: Sequence[Sample],
    image_scores: Any,
    maps: Sequence[Any] | None,
    threshold: float,
    fpr_limit: float = 0.3,
    flagged: Any = None,
) -> dict[str, Any]:
    """All test metrics of one model as a JSON-able dict.

    ``samples`` the test split, ``image_scores`` [N] raw image scores, ``maps`` the raw
    anomaly maps at model resolution (one 2-D array per sample) or None when the dataset
    has no masks (pixel metrics are then null), ``threshold`` the calibrated raw-score
    threshold (flag ``score > threshold``). Defective images without a mask count for the
    image metrics only. Undefined metrics (e.g. a test split without defects) are None and
    the reason is listed under ``notes``. ``flagged`` [N] bool: decisions of a rule
    that is more than the image threshold (the minimum-area rule, ``vitqc.decision``);
    None: ``score > threshold``.
    """
    samples = list(samples)
    n = len(samples)
    scores = np.asarray(image_scores, dtype=np.float64).ravel()
    if scores.size != n:
        raise VitqcError(f"got {scores.size} image scores for {n} test images")
    if maps is not None and len(maps) != n:
        raise VitqcError(f"got {len(maps)} anomaly maps for {n} test images")
    labels = np.array([s.label for s in samples], dtype=np.int64)
    defect_types = sorted({s.defect_type for s in samples if s.is_defective})

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result: dict[str, Any] = {
            "image_auroc": _num(image_auroc(labels, scores)),
            "image_prauc": _num(image_prauc(labels, scores)),
        }
        inputs = None if maps is None else _pixel_inputs(samples, maps)
        result.update(_pixel_metrics(inputs, int(labels.sum()), fpr_limit))
        if flagged is None:
            f1, precision, recall = f1_precision_recall(labels, scores, threshold)
            flagged = scores > float(threshold)
        else:
            flagged = np.asarray(flagged, dtype=bool).ravel()
            f1, precision, recall = decision_f1_precision_recall(labels, flagged)
        per_type: dict[str, dict[str, Any]] = {}
        good = labels == 0
        for dt in defect_types:
            of_type = np.array([s.is_defective and s.defect_type == dt for s in samples])
            sel = good | of_type
            per_type[dt] = {
                "image_auroc": _num(image_auroc(labels[sel], scores[sel])),
                "n_test": int(np.sum(of_type)),
                "recall": _num(np.mean(flagged[of_type])),
            }
            if inputs is not None and inputs.masks:  # its regions against every good pixel
                per_type[dt].update(_pixel_figures(inputs, fpr_limit, sel))
    for w in caught:
        if str(w.message) not in notes:
            notes.append(str(w.message))

    result.update(
        {
            "aupro_fpr_limit": float(fpr_limit),
            "threshold": float(threshold),
            "threshold_space": THRESHOLD_SPACE,
            "f1": _num(f1),
            "precision": _num(precision),
            "recall": _num(recall),
            "n_test": n,
            "n_test_good": int(good.sum()),
            "n_test_defective": int((~good).sum()),
            "confusion": {
                "tp": int(np.sum(flagged & ~good)),
                "fp": int(np.sum(flagged & good)),
                "tn": int(np.sum(~flagged & good)),
                "fn": int(np.sum(~flagged & ~good)),
            },
            "per_defect_type": per_type,
            "notes": notes,
        }
    )
    order = [
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "aupro_fpr_limit",
        "image_prauc",
        "threshold",
        "threshold_space",
        "f1",
        "precision",
        "recall",
        "n_test",
        "n_test_good",
        "n_test_defective",
        "n_pixel_images",
        "n_defective_without_mask",
        "confusion",
        "per_defect_type",
        "notes",
    ]
    return {k: result[k] for k in order}


#: How each threshold rule is described wherever a threshold is shown.
RULE_LABELS = {
    "fpr": "target false-reject rate on good-image scores",
    "f1": "F1-best on labelled defective validation images",
    "f1-synthetic": "F1-best against SYNTHETIC defects on the good validation images",
}


def describe_rule(calibration: Calibration) -> str:
    """The decision rule in words, as ``fit`` and ``evaluate`` print it."""
    cal = calibration
    text = f"rule {cal.method} ({RULE_LABELS.get(cal.method, cal.method)})"
    if cal.method == "fpr":
        text += f", target {cal.target_fpr:.2%}"
        if cal.requested_target_fpr:
            text += f" (requested {cal.requested_target_fpr:.2%}: too few good images)"
    elif cal.val_f1 is not None:
        text += f", validation F1 {cal.val_f1:.3f}"
    if cal.min_area:
        text += f", flagged only with a region of at least {cal.min_area:g} px"
    return text


def threshold_check(calibration: Calibration, labels: Any, flagged: Any) -> dict[str, Any]:
    """What the stored threshold promised against what the test split shows: the FPR
    interval a new good image should expect, the number of the m good test images it
    predicts flagged (beta-binomial), the observed number, and recall."""
    y = np.asarray(labels).ravel() != 0
    flagged = np.asarray(flagged, dtype=bool).ravel()
    m, n_bad = int((~y).sum()), int(y.sum())
    fp, tp = int(np.sum(flagged & ~y)), int(np.sum(flagged & y))
    out: dict[str, Any] = {
        "rule": calibration.method,
        "rule_label": RULE_LABELS.get(calibration.method, calibration.method),
        "rule_description": describe_rule(calibration),
        "target_fpr": calibration.target_fpr,
        "requested_target_fpr": calibration.requested_target_fpr,
        "normal_source": calibration.normal_source,
        "n_normal": calibration.n_normal,
        "expected_fpr": calibration.expected_fpr,
        "fpr_interval": calibration.fpr_interval,
        "interval_level": INTERVAL_LEVEL,
        "min_area": calibration.min_area,
        "n_test_good": m,
        "flagged_good": fp,
        "observed_fpr": fp / m if m else None,
        "n_test_defective": n_bad,
        "flagged_defective": tp,
        "recall": tp / n_bad if n_bad else None,
        "val_f1": calibration.val_f1,
    }
    if calibration.fpr_beta is not None and m:
        lo, hi = calibration.flagged_interval(m)
        out["flagged_good_interval"] = [lo, hi]
        out["fpr_inside"] = lo <= fp <= hi
    return out


def format_threshold_check(check: dict[str, Any]) -> str:
    """The check as a few plain lines for the terminal."""
    source = f"{check['n_normal']} {check['normal_source']} good-image scores"
    head = f"decision at the stored threshold: {check['rule_description']}"
    lines = [head]
    m = check["n_test_good"]
    if check.get("fpr_interval") is not None:
        lo, hi = check["fpr_interval"]
        line = (
            f"  promised: FPR {check['expected_fpr']:.2%} on new good images "
            f"({check['interval_level']:.0%}: {lo:.2%}-{hi:.2%}, from {source})"
        )
        if "flagged_good_interval" in check:
            a, b = check["flagged_good_interval"]
            line += f"; of {m} good test images {a}-{b} flagged"
        lines.append(line)
    else:
        lines.append("  promised: no FPR interval stored with this model (refit to get one)")
    if m:
        verdict = ""
        if "fpr_inside" in check:
            verdict = ", inside the promise" if check["fpr_inside"] else ", OUTSIDE the promise"
        line = (
            f"  observed: {check['flagged_good']} of {m} good test images flagged "
            f"(FPR {check['observed_fpr']:.2%}{verdict})"
        )
        if check["recall"] is not None:
            line += (
                f"; recall {check['recall']:.3f} ({check['flagged_defective']} of "
                f"{check['n_test_defective']} defective)"
            )
        lines.append(line)
    return "\n".join(lines)


@dataclass
class _PixelInputs:
    """The test images that have a mask: their indices in the test split, masks and maps
    at the image's original size."""

    index: list[int]
    masks: list[np.ndarray]
    maps: list[np.ndarray]
    missing: int  # defective images without a mask


def _pixel_inputs(samples: list[Sample], maps: Sequence[Any]) -> _PixelInputs:
    found = _PixelInputs([], [], [], 0)
    for i, (sample, amap) in enumerate(zip(samples, maps, strict=True)):
        shape = original_shape(sample)
        mask = load_mask(sample, shape)
        if mask is None:
            found.missing += 1
            continue
        found.index.append(i)
        found.masks.append(mask)
        found.maps.append(resize_map(amap, shape))
    return found


def _pixel_figures(
    inputs: _PixelInputs, fpr_limit: float, keep: np.ndarray | None = None
) -> dict[str, float | None]:
    """Pixel AUROC and AUPRO over the masked images (those ``keep[i]`` of the test split)."""
    chosen = [k for k, i in enumerate(inputs.index) if keep is None or keep[i]]
    masks = [inputs.masks[k] for k in chosen]
    maps = [inputs.maps[k] for k in chosen]
    if not masks:
        return {"pixel_auroc": None, "aupro": None}
    return {
        "pixel_auroc": _num(pixel_auroc(masks, maps)),
        "aupro": _num(aupro(masks, maps, fpr_limit)),
    }


def _pixel_metrics(
    inputs: _PixelInputs | None, n_defective: int, fpr_limit: float
) -> dict[str, Any]:
    if inputs is None:
        return {
            "pixel_auroc": None,
            "aupro": None,
            "n_pixel_images": 0,
            "n_defective_without_mask": n_defective,
        }
    if not inputs.masks:
        warnings.warn("no test image has a mask; pixel metrics are undefined", stacklevel=2)
    out: dict[str, Any] = _pixel_figures(inputs, fpr_limit)
    out["n_pixel_images"] = len(inputs.masks)
    out["n_defective_without_mask"] = inputs.missing
    return out


def _clean(obj: Any) -> Any:
    """Recursively replace nan/inf (invalid JSON) with None and numpy scalars with Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` as strict JSON (nan -> null), atomically."""
    write_json(path, _clean(result))


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_metrics_table(result: dict[str, Any], width: int = 88) -> str:
    """The metrics as readable tables (rendered by rich to plain text, no colour codes)."""
    from rich.console import Console
    from rich.table import Table

    main = Table(title="Test metrics", show_header=True, header_style="bold")
    main.add_column("Metric")
    main.add_column("Value", justify="right")
    rows = [
        ("Image AUROC", "image_auroc"),
        ("Image PR-AUC (average precision)", "image_prauc"),
        ("Pixel AUROC", "pixel_auroc"),
        (f"AUPRO (FPR <= {result.get('aupro_fpr_limit', 0.3):g})", "aupro"),
        ("Threshold (raw image score)", "threshold"),
        ("F1", "f1"),
        ("Precision", "precision"),
        ("Recall", "recall"),
        ("Good test images", "n_test_good"),
        ("Defective test images", "n_test_defective"),
    ]
    for label, key in rows:
        main.add_row(label, _fmt(result.get(key)))
    if result.get("n_defective_without_mask"):
        main.add_row("Defective images without mask", _fmt(result["n_defective_without_mask"]))

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(main)
    per_type = result.get("per_defect_type") or {}
    if per_type:
        pixel = any("aupro" in vals for vals in per_type.values())
        table = Table(title="Per defect type (each against all good test images)")
        table.add_column("Defect type")
        table.add_column("Images", justify="right")
        table.add_column("Image AUROC", justify="right")
        table.add_column("Recall", justify="right")
        if pixel:
            table.add_column("Pixel AUROC", justify="right")
            table.add_column("AUPRO", justify="right")
        for name, vals in per_type.items():
            cells = [name] + [_fmt(vals.get(k)) for k in ("n_test", "image_auroc", "recall")]
            if pixel:
                cells += [_fmt(vals.get("pixel_auroc")), _fmt(vals.get("aupro"))]
            table.add_row(*cells)
        console.print(table)
    for note in result.get("notes") or []:
        console.print(f"note: {note}", markup=False, highlight=False)
    return console.file.getvalue()  # type: ignore[attr-defined]
