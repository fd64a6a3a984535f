"""MNIST one-class protocol of the VT-ADL paper, through vitqc's public functions.

Each digit in turn is the normal class: fit on that digit's training images (80 %
train, 20 % validation for early stopping and calibration, as ``load_dataset`` splits
them), score all 10,000 test digits, report the image AUROC per digit and the mean.

    .venv/bin/python benchmarks/mnist_protocol.py --head vtadl --backbone pixels \
        --digits 0-9 --epochs 100 --out /tmp/mnist_vtadl.json
    .venv/bin/python benchmarks/mnist_protocol.py --head knn \
        --backbone tf_efficientnet_lite0 --out /tmp/mnist_knn.json

For VT-ADL the JSON also holds the AUROC of each image-score candidate: the training
loss (the paper's detection score), the maximum of the smoothed NLL map, and each loss
term alone (mean / max patch NLL, MSE, 1 - SSIM).

``--backbone pixels`` (the identity backbone VT-ADL trains on) runs at ``--image-size``
(28 by default: the digits' own size, where the head picks its "mnist" preset); other
backbones at their own input size unless ``--image-size`` is given, e.g.

    .venv/bin/python benchmarks/mnist_protocol.py --head knn \
        --backbone tf_efficientnet_lite0 --image-size 64 --out /tmp/mnist_knn64.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitqc.backbones.cache import FeatureCache
from vitqc.data.layouts import load_dataset
from vitqc.metrics import image_auroc
from vitqc.pipeline import FitOptions, fit, image_score_candidates, score_samples

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def parse_digits(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` head options; values parsed as JSON when they can be."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def auroc_by_anomalous_class(samples, scores: np.ndarray) -> dict[str, float]:
    """Normal digits against each other digit alone: which anomalies a score misses."""
    types = np.array([s.defect_type for s in samples])
    normal = types == "good"
    return {
        t: image_auroc(
            np.r_[np.zeros(normal.sum()), np.ones((types == t).sum())],
            np.r_[scores[normal], scores[types == t]],
        )
        for t in sorted(set(types) - {"good"})
    }


def run_digit(root: Path, digit: int, options: FitOptions, args: argparse.Namespace) -> dict:
    ds = load_dataset(root, format="mnist", normal_class=digit, seed=options.seed)
    if args.limit_train:
        ds.train, ds.val = ds.train[: args.limit_train], ds.val[: max(2, args.limit_train // 4)]
    if args.limit_test:
        ds.test = ds.test[: args.limit_test]
    start = time.perf_counter()
    model, report = fit(ds, options)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # cache backbone features (shared by every digit); raw pixels are cheaper to recompute
    cache = None
    if options.backbone != "pixels":
        cache = FeatureCache(args.cache_dir)
    scores, _ = score_samples(model, ds.test, cache=cache, progress=False)
    labels = np.array([s.label for s in ds.test])
    row: dict[str, Any] = {
        "digit": digit,
        "n_train": len(ds.train),
        "n_val": len(ds.val),
        "n_test": len(ds.test),
        "auroc": image_auroc(labels, scores),
        "auroc_by_anomalous_class": auroc_by_anomalous_class(ds.test, np.asarray(scores)),
        "fit_seconds": round(fit_seconds, 1),
        "report": report.to_dict(),
    }
    if options.head == "vtadl":
        cands = image_score_candidates(model, ds.test, batch_size=256)
        row["auroc_by_score"] = {k: image_auroc(labels, v) for k, v in cands.items()}
        row["auroc_by_score_and_class"] = {
            k: auroc_by_anomalous_class(ds.test, v) for k, v in cands.items()
        }
    row["score_seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--head", default="vtadl")
    ap.add_argument("--backbone", default="pixels")
    ap.add_argument("--layers", default=None, help="comma-separated backbone layers")
    ap.add_argument("--digits", default="0-9")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoothing-sigma", type=float, default=1.0)
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side (default: 28 for pixels, else the backbone's own size)",
    )
    ap.add_argument("--head-option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--limit-train", type=int, default=0)
    ap.add_argument("--limit-test", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol for ``args`` (see ``main``); returns the summary written to ``--out``."""
    options = FitOptions(
        backbone=args.backbone,
        layers=tuple(int(v) for v in args.layers.split(",")) if args.layers else None,
        image_size=args.image_size or (28 if args.backbone == "pixels" else None),
        head=args.head,
        head_options=parse_options(args.head_option),
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        smoothing_sigma=args.smoothing_sigma,
        cache_dir=args.cache_dir,
        progress=False,
    )
    rows = []
    for digit in parse_digits(args.digits):
        row = run_digit(args.root, digit, options, args)
        rows.append(row)
        extra = ""
        if "auroc_by_score" in row:
            extra = "  " + " ".join(f"{k}={v:.3f}" for k, v in row["auroc_by_score"].items())
        extra += "\n  by anomalous class: " + " ".join(
            f"{k.removeprefix('digit_')}={v:.3f}"
            for k, v in row["auroc_by_anomalous_class"].items()
        )
        train = row["report"].get("train") or {}
        print(
            f"digit {digit}: AUROC {row['auroc']:.4f}  fit {row['fit_seconds']}s "
            f"epochs {train.get('epochs_run', '-')} best {train.get('best_epoch', '-')}{extra}",
            flush=True,
        )
    summary = {
        "head": args.head,
        "backbone": args.backbone,
        "head_options": options.head_options,
        "epochs": args.epochs,
        "patience": args.patience,
        "mean_auroc": float(np.mean([r["auroc"] for r in rows])),
        "digits": rows,
    }
    if rows and "auroc_by_score" in rows[0]:
        summary["mean_auroc_by_score"] = {
            k: float(np.mean([r["auroc_by_score"][k] for r in rows]))
            for k in rows[0]["auroc_by_score"]
        }
    print(f"mean AUROC {summary['mean_auroc']:.4f}")
    if "mean_auroc_by_score" in summary:
        print("  " + " ".join(f"{k}={v:.4f}" for k, v in summary["mean_auroc_by_score"].items()))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
