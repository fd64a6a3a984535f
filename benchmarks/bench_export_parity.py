"""ONNX export parity on real images: torch against ONNX Runtime, and the runtime's
decisions against ``vitqc predict``.

For each head: ``vitqc.pipeline.fit`` on DATA (``--threshold-folds 0`` and a short
training budget: parity does not depend on how well a head is trained; the knn head on a
1 % coreset, since parity does not depend on the bank size either), saved as a bundle,
exported with ``vitqc.export``, then the first ``--images`` test images (as files, at
their original size) go through ``vitqc.predict`` (torch) and ``vitqc.runtime`` (ONNX
Runtime, Pillow resize). Prints per head: max relative score difference, max absolute
difference of the operator-scale maps, and how many decisions differ.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export_parity.py DATA \\
         [--heads gaussian,knn,flow,gmm] [--images 40] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from vitqc.bundle import load_bundle, save_bundle
from vitqc.data.io import read_image
from vitqc.data.layouts import load_dataset
from vitqc.data.transforms import resize_batch
from vitqc.decision import operator_score
from vitqc.export import export_bundle
from vitqc.pipeline import FitOptions, fit, predict_images
from vitqc.runtime import ExportedModel, resize_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--heads", default="gaussian,knn,flow,gmm")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--category", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    dataset = load_dataset(args.data, category=args.category, seed=0)
    # good and defective test images alternately, so both decisions occur
    good = [s for s in dataset.test if s.label == 0]
    bad = [s for s in dataset.test if s.label == 1]
    samples = [s for pair in zip(good, bad, strict=False) for s in pair][: args.images]
    files = [s.path for s in samples]
    print(f"{dataset.name}: {len(files)} test images (original sizes), torch vs ONNX Runtime")
    print(f"{'head':9} {'score rel diff':>15} {'map abs diff':>13} {'decisions differ':>17}")
    for head in args.heads.split(","):
        options = FitOptions(
            head=head,
            head_options={"coreset_ratio": 0.01} if head == "knn" else {},
            folds=0,
            epochs=3,
            cache_dir=args.cache_dir,
            progress=False,
        )
        model, report = fit(dataset, options)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / "model"
            save_bundle(model, bundle, {"fit": report.to_dict()})
            model, _ = load_bundle(bundle)
            runtime = ExportedModel(export_bundle(bundle, Path(tmp) / "model.onnx"), threads=1)
            rows = list(runtime.score_files(files))
            predicted = predict_images(model, files, Path(tmp) / "predict")
            size = model.input_size
            with torch.no_grad():
                maps, _ = model(resize_batch([read_image(p) for p in files], size))
            onnx_maps = runtime.run(np.stack([resize_image(read_image(p), size) for p in files]))
        torch_maps = operator_score(maps, model.map_low, model.threshold).numpy()
        t = np.array([p["score"] for p in predicted])
        o = np.array([r["score"] for r in rows])
        score_diff = float((np.abs(o - t) / np.abs(t).clip(1e-12)).max())
        map_diff = float(np.abs(onnx_maps["map"] - torch_maps).max())
        differ = sum(r["defective"] != p["defective"] for r, p in zip(rows, predicted, strict=True))
        print(f"{head:9} {score_diff:15.2e} {map_diff:13.2e} {differ:>11d} of {len(rows)}")


if __name__ == "__main__":
    main()
