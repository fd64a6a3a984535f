"""The command line end to end on a small synthetic dataset, and its bad-input handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitqc.bundle import load_bundle, save_bundle
from vitqc.data.layouts import load_dataset
from vitqc.pipeline import FitOptions, fit, score_samples


def run_cli(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if env_cache is not None:
        import os

        env = {**os.environ, "VITQC_CACHE": str(env_cache)}
    return subprocess.run(
        [sys.executable, "-m", "vitqc.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def fitted(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    model_dir = out / "model"
    proc = run_cli(
        "fit",
        synth_root,
        "--out",
        model_dir,
        "--head",
        "knn",
        "--category",
        "tile",
        env_cache=out / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    return out, model_dir


def test_fit_evaluate_predict(fitted, synth_root):
    out, model_dir = fitted
    config = json.loads((model_dir / "config.json").read_text())
    assert config["backbone"]["name"] == "tf_efficientnet_lite0"
    assert np.isfinite(config["calibration"]["threshold"])
    assert (model_dir / "model.safetensors").exists()

    metrics_path = out / "metrics.json"
    figures = out / "figures"
    proc = run_cli(
        "evaluate",
        model_dir,
        synth_root,
        "--category",
        "tile",
        "--out",
        metrics_path,
        "--maps",
        figures,
        env_cache=out / "cache",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(metrics_path.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_prauc", "threshold", "f1"):
        assert key in metrics
    assert metrics["image_auroc"] > 0.8
    assert metrics["n_test_good"] == 6 and metrics["n_test_defective"] == 8
    assert len(list(figures.glob("*.png"))) == 14
    assert "AUROC" in proc.stdout and "AUPRO" in proc.stdout

    pred_dir = out / "pred"
    proc = run_cli("predict", model_dir, synth_root / "tile" / "test", "--out", pred_dir)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((pred_dir / "predictions.json").read_text())
    assert len(rows) == 14
    assert (pred_dir / "predictions.csv").read_text().count("\n") == 15
    assert all(Path(r["overlay"]).exists() for r in rows)
    flagged_bad = [r["defective"] for r in rows if "/good/" not in r["file"]]
    assert sum(flagged_bad) >= len(flagged_bad) // 2


def test_bad_inputs_give_one_line_errors(fitted, tmp_path, synth_root):
    _, model_dir = fitted
    assert_one_line_error(run_cli("fit", tmp_path / "nope", "--out", tmp_path / "m"), "nope")
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--backbone", "no_such_net"),
        "no_such_net",
    )
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--head", "magic"), "magic"
    )
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--image-score", "top:2"), "top:2"
    )
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--head", "gmm:colour=red"),
        "gmm:colour=red",
    )
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--head", "vtadl", "--backbone",
                "tf_efficientnet_lite0", "--category", "tile"),
        "--head vtadl", "--backbone tf_efficientnet_lite0", "use --backbone pixels",
    )  # fmt: skip
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--max-minutes", "0"),
        "--max-minutes",
    )
    empty = tmp_path / "empty" / "train" / "good"
    empty.mkdir(parents=True)
    assert_one_line_error(run_cli("fit", tmp_path / "empty", "--out", tmp_path / "m"), "empty")
    assert_one_line_error(run_cli("evaluate", tmp_path / "nomodel", synth_root), "nomodel")
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"this is not a png")
    proc = run_cli("predict", model_dir, bad_image, "--out", tmp_path / "p")
    assert_one_line_error(proc, "broken.png")
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(weights))
    assert_one_line_error(
        run_cli("fit", synth_root, "--out", tmp_path / "m", "--weights", weights), "w.safetensors"
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "head,head_options", [("flow", {"steps": 2}), ("gmm", {"n_components": 4})]
)
def test_bundle_round_trip_gives_identical_scores(synth_root, tmp_path, head, head_options):
    """Whitening and mixture buffers included (the EfficientNet-Lite defaults)."""
    dataset = load_dataset(synth_root, category="tile")
    options = FitOptions(
        head=head,
        epochs=2,
        patience=2,
        cache_dir=tmp_path / "c",
        progress=False,
        image_score="top:0.05",
        statistics="position",  # the per-position whitening's buffers must travel
    )
    options.head_options = head_options
    model, _ = fit(dataset, options)
    assert model.head.standardize.mode == "position-whiten"
    scores, maps = score_samples(model, dataset.test, progress=False)
    save_bundle(model, tmp_path / "bundle")
    loaded, config = load_bundle(tmp_path / "bundle")
    scores2, maps2 = score_samples(loaded, dataset.test, progress=False)
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(maps, maps2)
    assert float(loaded.threshold) == float(model.threshold)
    assert loaded.image_score == config["image_score"] == "top:0.05"
    # the image score is the mean of the top 5 % of each (original-size) map's pixels
    top = [np.sort(m.ravel())[-max(1, round(0.05 * m.size)) :].mean() for m in maps]
    assert np.corrcoef(top, scores)[0, 1] > 0.99
    # batch independence of the whole model: one image alone scores as in a batch
    alone, _ = score_samples(loaded, dataset.test[:1], progress=False)
    assert alone[0] == pytest.approx(scores[0], rel=1e-5)


def test_fit_head_variant_with_time_budget_and_score_choice(synth_root, tmp_path):
    """``--head vtadl:option=value`` reaches the head, ``--max-minutes`` stops training
    after one epoch, and the score-choice benchmark agrees with ``evaluate``."""
    import importlib.util

    from vitqc.metrics import image_auroc

    model_dir = tmp_path / "vt"
    sizes = "width=16+depth=1+heads=2+mlp_dim=32+latent_dim=16+decoder_channels=16"
    proc = run_cli(
        "fit", synth_root, "--out", model_dir, "--category", "tile", "--backbone", "pixels",
        "--image-size", "64", "--head", f"vtadl:patch_size=8+{sizes}", "--epochs", "50",
        "--max-minutes", "1e-6",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "stopped by time" in proc.stdout
    config = json.loads((model_dir / "config.json").read_text())
    head_config = config["head"]["config"]
    assert (head_config["patch_size"], head_config["width"], head_config["preset"]) == (
        8,
        16,
        "mnist",
    )
    train = config["meta"]["fit"]["train"]
    assert (train["epochs_run"], train["stopped"], len(train["history"])) == (1, "time", 1)

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "image_score_choice.py"
    spec = importlib.util.spec_from_file_location("image_score_choice", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "choice.json"
    table = bench.main([str(model_dir), str(synth_root), "--category", "tile", "--out", str(out)])
    assert set(table) == {
        "map_max", "map_mean", "loss", "nll_mean", "nll_max", "mse", "one_minus_ssim",
        "loss_nll_max",
    }  # fmt: skip
    assert json.loads(out.read_text()) == table
    model, _ = load_bundle(model_dir)
    dataset = load_dataset(synth_root, category="tile")
    scores, _ = score_samples(model, dataset.test, progress=False)
    labels = [s.label for s in dataset.test]
    assert table["loss"]["all"] == pytest.approx(image_auroc(labels, scores), abs=1e-9)
    defect_types = {s.defect_type for s in dataset.test if s.label == 1}
    assert set(table["loss"]) == {"all", *defect_types}
