"""Grayscale images of more than 8 bits (a machine-vision camera's Mono12 saved as 16-bit
PNG): ``--bit-depth`` reads them with ``2 ** bits - 1`` as white, in fit, predict, the
exported runtime and the service alike. A 12-bit copy of an 8-bit dataset (each value
``round(u x 4095 / 255)``, which reads back as ``u``) gives the 8-bit dataset's model
and scores exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from vitqc.bundle import save_bundle
from vitqc.cli import app
from vitqc.data.io import read_image, white_level_for
from vitqc.data.layouts import load_dataset
from vitqc.errors import VitqcError
from vitqc.export import export_bundle
from vitqc.pipeline import FitOptions, fit, predict_images, score_samples
from vitqc.runtime import ExportedModel
from vitqc.serve.config import ServeConfig
from vitqc.serve.images import ImageRejected, decode
from vitqc.serve.service import InferenceService, Upload


def _twelve_bit(u8: np.ndarray) -> np.ndarray:
    return np.rint(u8.astype(np.float64) * 4095 / 255).astype(np.uint16)


@pytest.fixture(scope="module")
def datasets(synth_root, tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic tiles as 8-bit grayscale, and the same pictures as 12-bit data in
    16-bit PNGs; masks unchanged."""
    root = tmp_path_factory.mktemp("bits")
    eight, twelve = root / "u8", root / "u12"
    for path in sorted((synth_root / "tile").rglob("*.png")):
        rel = path.relative_to(synth_root / "tile")
        for base in (eight, twelve):
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == "ground_truth":
            shutil.copy(path, eight / rel)
            shutil.copy(path, twelve / rel)
            continue
        gray = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(gray).save(eight / rel)
        Image.fromarray(_twelve_bit(gray)).save(twelve / rel)
    return eight, twelve


def test_twelve_bit_values_read_as_their_eight_bit_pictures(datasets) -> None:
    eight, twelve = datasets
    files = sorted(twelve.rglob("test/*/*.png"))[:4]
    with Image.open(files[0]) as img:
        assert img.mode.startswith("I;16")
    for path in files:
        expected = read_image(eight / path.relative_to(twelve))
        np.testing.assert_array_equal(read_image(path, white_level_for(12)), expected)
        with pytest.raises(VitqcError, match=r"above the white level 255.*--bit-depth 12"):
            read_image(path)  # an 8-bit model refuses them, never clips them
    brighter = np.full((4, 4), 5000, np.uint16)  # above a 12-bit white
    Image.fromarray(brighter).save(twelve / "bright.png")
    with pytest.raises(VitqcError, match=r"bright\.png: .*above the white level 4095"):
        read_image(twelve / "bright.png", white_level_for(12))
    eight_bit_file = eight / files[0].relative_to(twelve)  # 8-bit files: as they are
    np.testing.assert_array_equal(
        read_image(eight_bit_file, white_level_for(12)), read_image(eight_bit_file)
    )
    with pytest.raises(VitqcError, match="--bit-depth must be 8 to 16"):
        white_level_for(7)


def test_a_twelve_bit_model_is_the_eight_bit_one_everywhere(datasets, tmp_path) -> None:
    eight, twelve = datasets
    models = {}
    for bits, root in ((8, eight), (12, twelve)):
        options = FitOptions(
            head="gaussian",
            statistics="position",
            folds=0,
            bit_depth=bits,
            cache_dir=tmp_path / "cache",
            progress=False,
        )
        models[bits], _ = fit(load_dataset(root), options)
    assert models[12].preprocessor.bit_depth == 12 and models[8].preprocessor.bit_depth == 8
    for name in ("channel_min", "channel_max"):
        assert getattr(models[12].preprocessor, name).equal(getattr(models[8].preprocessor, name))
    assert float(models[12].threshold) == float(models[8].threshold)
    scores = {
        bits: score_samples(models[bits], load_dataset(root).test, progress=False)[0]
        for bits, root in ((8, eight), (12, twelve))
    }
    np.testing.assert_array_equal(scores[12], scores[8])

    files = sorted(twelve.rglob("test/*/*.png"))[:3]
    predicted = predict_images(models[12], files, tmp_path / "p12")
    reference = predict_images(
        models[8], [eight / f.relative_to(twelve) for f in files], tmp_path / "p8"
    )
    assert [r["score"] for r in predicted] == [r["score"] for r in reference]

    save_bundle(models[12], tmp_path / "m12")
    onnx_path = export_bundle(tmp_path / "m12", tmp_path / "m12.onnx")
    runtime = ExportedModel(onnx_path, threads=1)
    assert runtime.info["resize"]["bit_depth"] == 12 and runtime.white_level == 4095
    rows = list(runtime.score_files(files))
    for row, p in zip(rows, predicted, strict=True):
        assert row["score"] == pytest.approx(p["score"], rel=1e-4)
    service = InferenceService(ServeConfig(model=onnx_path), model=runtime)
    (served,) = service.score([Upload(files[0].read_bytes(), "part.png")], None, False)
    assert served["score"] == pytest.approx(rows[0]["score"], rel=1e-5)  # alone vs a batch
    assert served["defective"] == rows[0]["defective"]
    with pytest.raises(ImageRejected) as refused:  # what an 8-bit model's service answers
        decode(files[0].read_bytes(), "part.png", 10**6)
    assert refused.value.status == 415 and "part.png" in str(refused.value)


def test_inspect_takes_the_bit_depth(datasets) -> None:
    """(A depth out of range is a one-line error: test_cli's bad inputs.)"""
    _, twelve = datasets
    runner = CliRunner()
    refused = runner.invoke(app, ["inspect", str(twelve)])
    assert refused.exit_code == 1 and "--bit-depth 12" in refused.output
    inspected = runner.invoke(app, ["inspect", str(twelve), "--bit-depth", "12"])
    assert inspected.exit_code == 0, inspected.output


def test_a_benchmark_grid_reads_twelve_bit_data_with_its_depth(datasets, tmp_path) -> None:
    from vitqc.bench.store import open_store
    from vitqc.cli_bench import register

    grid = typer.Typer()
    register(grid)
    figures = {}
    for bits, root in ((8, datasets[0]), (12, datasets[1])):
        db = tmp_path / f"r{bits}.sqlite"
        args = ["benchmark", "--data", str(root), "--backbones", "test_resnet", "--heads",
                "gaussian", "--weights", "random", "--folds", "0", "--no-timing", "--db",
                str(db), "--cache-dir", str(tmp_path / "c"), "--bit-depth", str(bits)]  # fmt: skip
        result = CliRunner().invoke(grid, args)
        assert result.exit_code == 0, result.output
        with open_store(db, create=False) as store:
            (run,) = store.runs()
        assert run["status"] == "ok" and run["config"].get("bit_depth") == (
            12 if bits > 8 else None
        )
        figures[bits] = [run[k] for k in ("image_auroc", "pixel_auroc", "aupro")]
    assert figures[12] == figures[8]
