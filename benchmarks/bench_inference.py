"""Inference speed: images/second at batch 1 and 32, backbone alone and backbone + head.

Fits each head briefly on a small synthetic dataset (latency does not depend on how well
a head is trained), then times the whole pipeline with vitqc's own latency probe
(median of repeats). Run: .venv/bin/python benchmarks/bench_inference.py [--backbone NAME]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from vitqc.bench.timing import measure_latency
from vitqc.data.layouts import load_dataset
from vitqc.data.synth import generate_synthetic
from vitqc.pipeline import FitOptions, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--heads", default="flow,gmm,knn")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(
            Path(tmp) / "data", n_train=40, n_test_good=2, n_test_defective=2, size=224, seed=0
        )
        dataset = load_dataset(root)
        print(f"{'model':<32}{'img/s b1':>10}{'img/s b32':>11}{'ms b1':>9}{'ms b32':>9}")
        backbone_row = None
        for head in args.heads.split(","):
            opts = FitOptions(
                backbone=args.backbone,
                head=head,
                epochs=2,
                patience=2,
                cache_dir=Path(tmp) / "cache",
                progress=False,
            )
            model, _ = fit(dataset, opts)
            lat = measure_latency(model, (1, 32), min_seconds=2.0, min_repeats=5)
            if backbone_row is None:
                backbone_row = (lat["backbone_ms_b1"], lat["backbone_ms_b32"])
                b1, b32 = backbone_row
                print(
                    f"{args.backbone + ' (backbone)':<32}{1000 / b1:>10.1f}{1000 / b32:>11.1f}"
                    f"{b1:>9.2f}{b32:>9.2f}"
                )
            p1, p32 = lat["pipeline_ms_b1"], lat["pipeline_ms_b32"]
            print(
                f"{'  + ' + head:<32}{1000 / p1:>10.1f}{1000 / p32:>11.1f}"
                f"{p1:>9.2f}{p32:>9.2f}   (head adds {p32 - backbone_row[1]:+.2f} ms/img at b32)"
            )


if __name__ == "__main__":
    main()
