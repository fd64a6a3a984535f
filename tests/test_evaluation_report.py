"""evaluate_predictions, the metrics JSON and the terminal table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitqc.data.io import read_mask
from vitqc.data.records import Sample
from vitqc.errors import VitqcError
from vitqc.metrics import aupro, pixel_auroc, resize_map
from vitqc.report.evaluation import (
    evaluate_predictions,
    format_metrics_table,
    write_metrics_json,
)

REQUIRED_KEYS = {
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "aupro_fpr_limit",
    "image_prauc",
    "threshold",
    "f1",
    "precision",
    "recall",
    "n_test_good",
    "n_test_defective",
    "per_defect_type",
}


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _mvtec_like(tmp_path: Path) -> tuple[list[Sample], np.ndarray, list[np.ndarray]]:
    """Two image sizes; a real mask, an empty defective mask, a defective image w/o mask."""
    rng = np.random.default_rng(0)

    def image(name, h, w):
        return _png(tmp_path / f"{name}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    crack_mask = np.zeros((20, 30), np.uint8)
    crack_mask[5:11, 5:13] = 255
    crack_mask[11, 13] = 255  # touches the block (corner 10,12) only diagonally: one region
    samples = [
        Sample("good/0", 0, "good", image("g0", 20, 30)),
        Sample("good/1", 0, "good", image("g1", 24, 16)),
        Sample(
            "crack/0", 1, "crack", image("c0", 20, 30), _png(tmp_path / "c0_mask.png", crack_mask)
        ),
        Sample(
            "scratch/0",
            1,
            "scratch",
            image("s0", 24, 16),
            _png(tmp_path / "s0_mask.png", np.zeros((24, 16), np.uint8)),
        ),
        Sample("crack/1", 1, "crack", image("c1", 20, 30)),  # defective, mask file missing
    ]
    scores = np.array([0.1, 0.2, 0.9, 0.15, 0.5])
    maps = [rng.random((8, 8)).astype(np.float32) for _ in samples]
    maps[2][2:4, 1:4] += 1.0  # roughly where the crack is
    return samples, scores, maps


def test_image_metrics_by_hand(tmp_path):
    samples, scores, maps = _mvtec_like(tmp_path)
    res = evaluate_predictions(samples, scores, maps, threshold=0.3)
    assert res.keys() >= REQUIRED_KEYS
    # Defective {0.9, 0.15, 0.5} vs good {0.1, 0.2}: 2 + 1 + 2 = 5 of 6 pairs.
    assert res["image_auroc"] == pytest.approx(5 / 6)
    # 0.9 d: P1 R1/3; 0.5 d: P1 R2/3; 0.2 g: -; 0.15 d: P3/4 R1 -> AP = 1/3 + 1/3 + 1/4.
    assert res["image_prauc"] == pytest.approx(11 / 12)
    # > 0.3 flags 0.9 and 0.5: TP 2, FP 0, FN 1 (the empty-mask image still counts).
    assert res["precision"] == 1.0
    assert res["recall"] == pytest.approx(2 / 3)
    assert res["f1"] == pytest.approx(0.8)
    assert res["confusion"] == {"tp": 2, "fp": 0, "tn": 2, "fn": 1}
    assert res["threshold"] == 0.3 and res["aupro_fpr_limit"] == 0.3
    assert (res["n_test"], res["n_test_good"], res["n_test_defective"]) == (5, 2, 3)
    # crack {0.9, 0.5} vs good: 1.0, both flagged; scratch {0.15} vs {0.1, 0.2}: 1/2,
    # not flagged.
    per_type = {
        name: {k: v[k] for k in ("image_auroc", "n_test", "recall")}
        for name, v in res["per_defect_type"].items()
    }
    assert per_type == {
        "crack": {"image_auroc": 1.0, "n_test": 2, "recall": 1.0},
        "scratch": {"image_auroc": 0.5, "n_test": 1, "recall": 0.0},
    }


def test_pixel_metrics_per_defect_type_against_every_good_image(tmp_path):
    """A defect type's pixel AUROC and AUPRO are those of its masked images together
    with every good image; a type whose masks are all empty has none (noted)."""
    samples, scores, maps = _mvtec_like(tmp_path)
    res = evaluate_predictions(samples, scores, maps, threshold=0.3)
    masks = [np.zeros((20, 30), bool), np.zeros((24, 16), bool), read_mask(samples[2].mask_path)]
    big = [resize_map(m, k.shape) for m, k in zip([maps[0], maps[1], maps[2]], masks, strict=True)]
    crack = res["per_defect_type"]["crack"]
    assert crack["pixel_auroc"] == pytest.approx(pixel_auroc(masks, big))
    assert crack["aupro"] == pytest.approx(aupro(masks, big, 0.3))
    assert crack["pixel_auroc"] != pytest.approx(res["pixel_auroc"])  # not the overall figure
    scratch = res["per_defect_type"]["scratch"]
    assert scratch["pixel_auroc"] is None and scratch["aupro"] is None
    assert any("pixel AUROC" in note for note in res["notes"])
    # without maps: image figures only
    res = evaluate_predictions(samples, scores, None, threshold=0.3)
    assert set(res["per_defect_type"]["crack"]) == {"image_auroc", "n_test", "recall"}


def test_pixel_metrics_at_original_mask_resolution(tmp_path):
    samples, scores, maps = _mvtec_like(tmp_path)
    res = evaluate_predictions(samples, scores, maps, threshold=0.3)
    assert res["n_pixel_images"] == 4 and res["n_defective_without_mask"] == 1
    # Same numbers by hand-wiring: masks read at full size, maps resized to them, the
    # defective image without a mask left out.
    masks = [np.zeros((20, 30), bool), np.zeros((24, 16), bool)]
    masks += [read_mask(samples[2].mask_path), read_mask(samples[3].mask_path)]
    big = [resize_map(m, k.shape) for m, k in zip(maps[:4], masks, strict=True)]
    assert res["pixel_auroc"] == pytest.approx(pixel_auroc(masks, big))
    assert res["aupro"] == pytest.approx(aupro(masks, big, 0.3))
    assert res["pixel_auroc"] > 0.75 and res["aupro"] > 0.4  # the boost is found
    # The map of the maskless defective image plays no part.
    maps2 = [m.copy() for m in maps]
    maps2[4][:] = 1e6
    res2 = evaluate_predictions(samples, scores, maps2, threshold=0.3)
    assert (res2["pixel_auroc"], res2["aupro"]) == (res["pixel_auroc"], res["aupro"])


def test_dataset_without_masks_has_null_pixel_metrics():
    # MNIST-like: in-memory samples, no masks, no maps.
    samples = [
        Sample(str(i), int(i >= 3), "good" if i < 3 else "digit_7", array=np.zeros((28, 28)))
        for i in range(5)
    ]
    scores = np.array([0.1, 0.2, 0.3, 0.25, 0.9])
    res = evaluate_predictions(samples, scores, None, threshold=0.5)
    assert res["pixel_auroc"] is None and res["aupro"] is None
    assert res["n_defective_without_mask"] == 2
    # {0.25, 0.9} vs {0.1, 0.2, 0.3}: 2 + 3 = 5 of 6.
    assert res["image_auroc"] == pytest.approx(5 / 6)
    # With maps but still no masks for the defects, pixel metrics are undefined: None + note.
    maps = [np.zeros((7, 7)) for _ in samples]
    res = evaluate_predictions(samples, scores, maps, threshold=0.5)
    assert res["pixel_auroc"] is None and res["aupro"] is None
    assert any("pixel AUROC" in note for note in res["notes"])


def test_test_split_without_defects_reports_nulls(tmp_path):
    samples = [Sample(str(i), 0, "good", array=np.zeros((4, 4))) for i in range(3)]
    res = evaluate_predictions(samples, [0.1, 0.2, 0.3], None, threshold=0.25)
    assert res["image_auroc"] is None and res["recall"] is None and res["f1"] is None
    assert res["per_defect_type"] == {}
    assert res["notes"]


def test_json_is_strict_and_complete(tmp_path):
    samples, scores, maps = _mvtec_like(tmp_path)
    res = evaluate_predictions(samples, scores, maps, threshold=0.3)
    res["extra_nan"] = float("nan")
    path = tmp_path / "out" / "metrics.json"
    write_metrics_json(path, res)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data.keys() >= REQUIRED_KEYS
    assert data["extra_nan"] is None
    assert data["per_defect_type"]["crack"]["image_auroc"] == 1.0
    assert data["image_auroc"] == pytest.approx(5 / 6)
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temp file


def test_table_rendering(tmp_path):
    samples, scores, maps = _mvtec_like(tmp_path)
    text = format_metrics_table(evaluate_predictions(samples, scores, maps, threshold=0.3))
    assert "\x1b" not in text  # plain text, no colour codes
    for needle in ("Image AUROC", "0.8333", "AUPRO (FPR <= 0.3)", "Pixel AUROC", "0.9167"):
        assert needle in text
    assert "crack" in text and "scratch" in text and "1.0000" in text
    assert "Per defect type" in text and "Recall" in text and text.count("AUPRO") == 2
    assert "Defective images without mask" in text
    mnist = [
        Sample(str(i), i % 2, "good" if i % 2 == 0 else "x", array=np.zeros((4, 4)))
        for i in range(4)
    ]
    text = format_metrics_table(evaluate_predictions(mnist, [0.1, 0.9, 0.2, 0.8], None, 0.5))
    assert "n/a" in text


def test_input_errors(tmp_path):
    samples, scores, maps = _mvtec_like(tmp_path)
    with pytest.raises(VitqcError, match="image scores"):
        evaluate_predictions(samples, scores[:3], maps, 0.3)
    with pytest.raises(VitqcError, match="anomaly maps"):
        evaluate_predictions(samples, scores, maps[:3], 0.3)
    # A mask whose size differs from its image is a one-line error naming the file.
    _png(tmp_path / "c0_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(VitqcError, match="c0_mask.png"):
        evaluate_predictions(samples, scores, maps, 0.3)
