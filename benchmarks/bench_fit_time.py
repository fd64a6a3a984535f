"""Fit time of every head against the PaDiM-style fit, on one dataset, one run.

The localization issue asks that flow and GMM fit within 5x the time of a PaDiM-style fit
on the same machine, cached features allowed for both. The PaDiM-style fit is vitqc's
training-free ``gaussian`` head (PaDiM's per-position Gaussian through the same code).
The features are extracted once first (the cache), then each head is fitted with
``vitqc.pipeline.fit`` exactly as ``vitqc fit`` would (statistics choice, proxy epoch
selection, calibration) and timed as a whole; the table gives the head time, the
feature-read time, the kept and run epochs with the precision the training steps ran in
(``vitqc.training``: bfloat16 for the flow on CPUs that compute it natively) and the ratio
of the total to the gaussian head's total.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fit_time.py DATA [--heads ...]
[--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from vitqc.data.layouts import load_dataset
from vitqc.pipeline import FitOptions, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--heads", default="gaussian,gmm,flow,knn")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--category", default=None)
    parser.add_argument(
        "--folds", type=int, default=None, help="threshold folds (default: fit's; 0: none)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fit every head this many times, in turn; medians are printed, each ratio "
        "taken against the gaussian fit of its own round (the machine's speed drifts)",
    )
    args = parser.parse_args()
    folds = {} if args.folds is None else {"folds": args.folds}
    heads = args.heads.split(",")
    if "gaussian" not in heads:
        heads = ["gaussian", *heads]
    dataset = load_dataset(args.data, category=args.category, seed=0)
    runs: dict[str, list[tuple[float, float, float, str]]] = {h: [] for h in heads}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        start = time.perf_counter()
        fit(dataset, FitOptions(head="gaussian", cache_dir=cache, progress=False, **folds))
        print(f"first fit (extracts and caches the features): {time.perf_counter() - start:.1f} s")
        for _ in range(args.rounds):
            for head in heads:
                start = time.perf_counter()
                options = FitOptions(head=head, cache_dir=cache, progress=False, **folds)
                _, report = fit(dataset, options)
                total = time.perf_counter() - start
                train = report.train
                epochs = f"{train.best_epoch}/{train.epochs_run}" if train else "-"
                if train:  # the precision the steps ran in (bfloat16 on CPUs with it)
                    epochs += f" ({train.precision})"
                runs[head].append((report.feature_seconds, report.head_seconds, total, epochs))
    print(
        f"{args.data.name}: {len(dataset.train)} train / {len(dataset.val)} val images, "
        f"{args.rounds} round(s), medians"
    )
    print(
        "| head | features from cache (s) | head (s) | total (s) | best/run epochs (steps) "
        "| x gaussian (per round) |"
    )
    print("|---|---|---|---|---|---|")
    base = [r[2] for r in runs["gaussian"]]
    for head, rows in runs.items():
        feat_s, head_s, total = (statistics.median(r[i] for r in rows) for i in range(3))
        ratios = [r[2] / b for r, b in zip(rows, base, strict=True)]
        each = ", ".join(f"{x:.2f}" for x in ratios) if len(ratios) > 1 else ""
        ratio = f"{statistics.median(ratios):.2f}" + (f" ({each})" if each else "")
        epochs = "; ".join(sorted({r[3] for r in rows}))
        print(f"| {head} | {feat_s:.1f} | {head_s:.1f} | {total:.1f} | {epochs} | {ratio} |")


if __name__ == "__main__":
    main()
