"""Head training from the feature cache vs rerunning the frozen backbone every epoch.

anomalib's FastFlow runs the frozen backbone on every image in every epoch. vitqc
extracts features once and trains the head on the cached tensors. This script fits the
same flow head for the same number of epochs both ways on the same synthetic data and
prints both times and their ratio. Run: .venv/bin/python benchmarks/bench_fit_cache.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitqc.backbones import create_backbone
from vitqc.backbones.cache import FeatureCache
from vitqc.data.layouts import load_dataset
from vitqc.data.synth import generate_synthetic
from vitqc.data.transforms import iter_resized_batches
from vitqc.heads import create_head
from vitqc.pipeline import build_preprocessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(
            Path(tmp) / "data",
            n_train=args.images,
            n_test_good=1,
            n_test_defective=1,
            size=224,
            seed=0,
        )
        train = load_dataset(root, val_fraction=0.0).train
        extractor = create_backbone("tf_efficientnet_lite0")
        pre = build_preprocessor(extractor, train, minmax=True)

        def make_head():
            shapes = extractor.feature_shapes()
            head = create_head(
                "flow", [c for c, _, _ in shapes], [(h, w) for _, h, w in shapes], steps=8, seed=0
            )
            head.prepare(
                FeatureCache(Path(tmp) / "c0").extract(extractor, pre, train, progress=False)
            )
            return head, torch.optim.Adam(head.parameters(), lr=1e-4)

        # A: features cached once (the extraction time is counted), head trains on tensors.
        head, opt = make_head()
        start = time.perf_counter()
        feats = FeatureCache(Path(tmp) / "c1").extract(extractor, pre, train, progress=False)
        for _ in range(args.epochs):
            for i in range(0, len(train), args.batch_size):
                loss = head.loss([f[i : i + args.batch_size] for f in feats])
                opt.zero_grad()
                loss.backward()
                opt.step()
        cached = time.perf_counter() - start

        # B: load, resize, preprocess and run the backbone again every epoch.
        head, opt = make_head()
        start = time.perf_counter()
        for _ in range(args.epochs):
            for x in iter_resized_batches(train, extractor.input_size, args.batch_size):
                loss = head.loss(extractor(pre(x)))
                opt.zero_grad()
                loss.backward()
                opt.step()
        rerun = time.perf_counter() - start
    print(
        f"{len(train)} images, {args.epochs} epochs, flow head (8 steps) on tf_efficientnet_lite0"
    )
    print(f"from feature cache (incl. one extraction): {cached:7.1f} s")
    print(f"backbone rerun every epoch:                {rerun:7.1f} s")
    print(f"ratio rerun / cached:                      {rerun / cached:7.2f}x")


if __name__ == "__main__":
    main()
