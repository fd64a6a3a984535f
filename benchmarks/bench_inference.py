"""Inference speed: torch beside ONNX Runtime, ms per image at batch 1 and 32, backbone
alone and the full model (backbone + head + maps + calibration).

Fits each head briefly on a small synthetic dataset (latency does not depend on how well
a head is trained), exports it with ``vitqc.export`` (and the preprocessing + backbone
alone the same way), then times both with vitqc's own latency probe (median of repeats).
ONNX Runtime gets as many threads as torch. With ``--data`` the timed batches are that
dataset's test images (resized to the input size) instead of synthetic ones. Run:
.venv/bin/python benchmarks/bench_inference.py [--backbone NAME] [--heads flow,gmm,knn]
    [--data ../shared/data/kolektorsdd --cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from vitqc.bench.timing import measure_latency, time_per_image_ms
from vitqc.data.io import load_image
from vitqc.data.layouts import load_dataset
from vitqc.data.synth import generate_synthetic
from vitqc.data.transforms import resize_batch
from vitqc.export import OPSET, export_onnx
from vitqc.pipeline import FitOptions, fit
from vitqc.scoring import AnomalyModel

BATCHES = (1, 32)


class _Backbone(nn.Module):
    """Preprocessing + frozen backbone: what the "backbone" rows time."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.preprocessor, self.extractor = model.preprocessor, model.extractor

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(self.preprocessor(image))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export_backbone(model: AnomalyModel, path: Path) -> Path:
    h, w = model.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Backbone(model).eval(),
            (torch.rand(2, 3, h, w),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            dynamic_axes={"image": {0: "N"}},
        )
    return path


def _ort_ms(session: ort.InferenceSession, images: torch.Tensor) -> dict[int, float]:
    return {
        bs: time_per_image_ms(
            lambda t: session.run(None, {"image": t.numpy()}),
            images[torch.arange(bs) % images.shape[0]],
            min_seconds=2.0,
            min_repeats=5,
        )
        for bs in BATCHES
    }


def _row(name: str, ms_b1: float, ms_b32: float, note: str = "") -> str:
    rates = f"{1000 / ms_b1:>10.1f}{1000 / ms_b32:>11.1f}"
    return f"{name:<34}{ms_b1:>10.2f}{ms_b32:>11.2f}{rates}{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--heads", default="flow,gmm,knn")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="time on this dataset's test images (default: synthetic)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()} (ONNX Runtime {ort.__version__}: the same)")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or generate_synthetic(
            Path(tmp) / "data", n_train=40, n_test_good=2, n_test_defective=2, size=224, seed=0
        )
        dataset = load_dataset(root)
        print(f"images: {len(dataset.test[:32])} test images of {root}, resized to the input size")
        print(f"{'model':<34}{'ms b1':>10}{'ms b32':>11}{'img/s b1':>10}{'img/s b32':>11}")
        backbone_done = False
        for head in args.heads.split(","):
            opts = FitOptions(
                backbone=args.backbone,
                head=head,
                epochs=2,
                patience=2,
                folds=0,
                cache_dir=args.cache_dir or Path(tmp) / "cache",
                progress=False,
            )
            model, _ = fit(dataset, opts)
            images = resize_batch([load_image(x) for x in dataset.test[:32]], model.input_size)
            lat = measure_latency(model, BATCHES, min_seconds=2.0, min_repeats=5, images=images)
            onnx_path = export_onnx(model, Path(tmp) / f"{head}.onnx", {})
            ort_full = _ort_ms(_session(onnx_path), images)
            if not backbone_done:
                backbone_done = True
                ort_bb = _ort_ms(
                    _session(_export_backbone(model, Path(tmp) / "backbone.onnx")), images
                )
                print(
                    _row(
                        f"{args.backbone} (backbone) torch",
                        lat["backbone_ms_b1"],
                        lat["backbone_ms_b32"],
                    )
                )
                print(_row(f"{args.backbone} (backbone) onnxrt", ort_bb[1], ort_bb[32]))
            p1, p32 = lat["pipeline_ms_b1"], lat["pipeline_ms_b32"]
            print(_row(f"  + {head} torch", p1, p32))
            speedup = f"   (x{p1 / ort_full[1]:.2f} b1, x{p32 / ort_full[32]:.2f} b32 vs torch)"
            print(_row(f"  + {head} onnxrt", ort_full[1], ort_full[32], speedup))


if __name__ == "__main__":
    main()
