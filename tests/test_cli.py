"""The command line end to end on a small synthetic dataset, and its bad-input handling."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
    (out / "fit.stdout").write_text(proc.stdout)
    (out / "fit.stderr").write_text(proc.stderr)
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
    # what the stored threshold promised, next to what the test split shows
    check = metrics["threshold_check"]
    assert check["rule"] == "fpr" and check["normal_source"] == "out-of-fold"
    lo, hi = check["flagged_good_interval"]
    assert check["flagged_good"] == metrics["confusion"]["fp"]
    assert check["fpr_inside"] == (lo <= check["flagged_good"] <= hi)
    assert check["recall"] == pytest.approx(metrics["recall"])
    assert "promised: FPR" in proc.stdout and "observed:" in proc.stdout

    pred_dir = out / "pred"
    proc = run_cli("predict", model_dir, synth_root / "tile" / "test", "--out", pred_dir)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((pred_dir / "predictions.json").read_text())
    assert len(rows) == 14
    assert (pred_dir / "predictions.csv").read_text().count("\n") == 15
    assert all(Path(r["overlay"]).exists() for r in rows)
    flagged_bad = [r["defective"] for r in rows if "/good/" not in r["file"]]
    assert sum(flagged_bad) >= len(flagged_bad) // 2

    # the minimum-area rule: a region as large as the image flags nothing; every
    # flagged image has a region of at least the minimum
    big = run_cli(
        "predict",
        model_dir,
        synth_root / "tile" / "test",
        "--out",
        out / "p2",
        "--min-area",
        "100000",
    )
    assert big.returncode == 0, big.stderr
    rows2 = json.loads((out / "p2" / "predictions.json").read_text())
    assert not any(r["defective"] for r in rows2)
    assert all(r["min_area_px"] == 100000 for r in rows2)
    small = run_cli(
        "predict", model_dir, synth_root / "tile" / "test", "--out", out / "p3", "--min-area", "20"
    )
    rows3 = json.loads((out / "p3" / "predictions.json").read_text())
    for plain, area in zip(rows, rows3, strict=True):
        assert area["defective"] == (plain["defective"] and area["largest_region_px"] >= 20)
    assert small.returncode == 0


def test_fit_states_the_threshold_with_its_interval(fitted):
    out, model_dir = fitted
    config = json.loads((model_dir / "config.json").read_text())
    cal = config["calibration"]
    assert cal["normal_source"] == "out-of-fold" and cal["n_normal"] == 20
    assert cal["fpr_interval"][0] < cal["expected_fpr"] < cal["fpr_interval"][1]
    stdout = (out / "fit.stdout").read_text()
    assert "from 20 out-of-fold good-image scores" in stdout and "interval" in stdout
    assert "out-of-fold scores: 5 fold models in" in stdout
    # 20 good images cannot support 1 %: said once, on one line, and in the bundle
    warning = [line for line in (out / "fit.stderr").read_text().splitlines() if "1.00%" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: a target FPR of 1.00%")
    assert cal["requested_target_fpr"] == 0.01 and cal["target_fpr"] == pytest.approx(1 / 21)


def test_bad_inputs_give_one_line_errors(fitted, tmp_path, synth_root):
    """Each bad input is refused in one line naming it, before anything is written. The
    cases are separate processes (the real exit and stderr); they run two at a time."""
    _, model_dir = fitted
    empty = tmp_path / "empty" / "train" / "good"
    empty.mkdir(parents=True)
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"this is not a png")
    mono12 = tmp_path / "mono12.png"  # a 12-bit camera image: refused, never clipped
    Image.fromarray(np.full((32, 32), 4000, np.uint16)).save(mono12)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(weights))
    fit = ("fit", synth_root, "--out", tmp_path / "m")
    fit_tile = (*fit, "--category", "tile")
    cases = [  # (command line, what its error must name)
        (("fit", tmp_path / "nope", "--out", tmp_path / "m"), ["nope"]),
        ((*fit, "--backbone", "no_such_net"), ["no_such_net"]),
        ((*fit, "--head", "magic"), ["magic"]),
        ((*fit, "--image-score", "top:2"), ["top:2"]),
        ((*fit, "--head", "gmm:colour=red"), ["gmm:colour=red"]),
        (
            (*fit_tile, "--head", "vtadl", "--backbone", "tf_efficientnet_lite0"),
            ["--head vtadl", "--backbone tf_efficientnet_lite0", "use --backbone pixels"],
        ),
        ((*fit, "--max-minutes", "0"), ["--max-minutes"]),
        ((*fit, "--train-precision", "half"), ["--train-precision", "half"]),
        (
            (*fit, "--head", "gmm", "--train-precision", "bfloat16"),
            ["--train-precision bfloat16", "gmm"],
        ),
        (("fit", tmp_path / "empty", "--out", tmp_path / "m"), ["empty"]),
        (("evaluate", tmp_path / "nomodel", synth_root), ["nomodel"]),
        (("predict", model_dir, bad_image, "--out", tmp_path / "p"), ["broken.png"]),
        (("predict", model_dir, mono12, "--out", tmp_path / "p"), ["mono12.png", "4000"]),
        ((*fit, "--weights", weights), ["w.safetensors"]),
        ((*fit, "--bit-depth", "7"), ["--bit-depth must be 8 to 16", "got 7"]),
        (("inspect", synth_root, "--bit-depth", "17"), ["--bit-depth must be 8 to 16"]),
        (("inspect", synth_root, "--lookalike", "300"), ["--lookalike must be 0 to 256"]),
        (("inspect", synth_root, "--figures", bad_image), ["cannot write the figures"]),
        # threshold options
        ((*fit_tile, "--min-area", "3mm2"), ["--mm-per-pixel"]),
        (
            (*fit_tile, "--target-fpr", "0.01", "--head", "gaussian"),
            ["lowest target", "--target-fpr 0.0477"],
        ),
    ]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: run_cli(*case[0]), cases))
    for (_, needles), proc in zip(cases, procs, strict=True):
        assert_one_line_error(proc, *needles)
    assert not (tmp_path / "m").exists()


def test_f1_rule_on_the_users_defective_images(synth_root, tmp_path):
    from vitqc.data.synth import generate_synthetic
    from vitqc.pipeline import defect_samples

    other = tmp_path / "other"  # defective images that are not test images
    generate_synthetic(other, n_train=2, n_test_good=1, n_test_defective=6, size=96, seed=7)
    folder = tmp_path / "val_defects"
    for path in (other / "tile" / "test").rglob("*.png"):
        if path.parent.name != "good":
            (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
            (folder / path.parent.name / path.name).write_bytes(path.read_bytes())
    dataset = load_dataset(synth_root, category="tile")
    options = FitOptions(
        head="gaussian",
        statistics="position",
        calibration="f1",
        val_defects=defect_samples(folder),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    model, report = fit(dataset, options)
    cal = report.calibration
    assert cal.method == "f1" and cal.n_val_defective == 6 and cal.val_f1 is not None
    assert cal.normal_source == "out-of-fold" and cal.fpr_interval is not None
    assert float(model.threshold) == pytest.approx(cal.threshold, rel=1e-6)  # float32 buffer


@pytest.mark.parametrize(
    "head,head_options", [("flow", {"steps": 2}), ("gmm", {"n_components": 4})]
)
def test_bundle_round_trip_gives_identical_scores(synth_root, tmp_path, head, head_options):
    """Whitening and mixture buffers included (the EfficientNet-Lite defaults)."""
    dataset = load_dataset(synth_root, category="tile")
    options = FitOptions(
        head=head,
        folds=0,  # the buffers are the point here; thresholds: test_thresholds.py
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
