"""Threshold rules on real data: the validation-only rule against out-of-fold scores.

For each head: ``vitqc.pipeline.fit`` as ``vitqc fit`` runs it (its threshold rests on
out-of-fold scores of every good image, ``vitqc.folds``), then the test split is scored
once. Two rules are read off the same final model:

- ``validation``: the rule before issue 15, the 1 %-FPR point of the good validation
  images (with fewer than 99 of them: their maximum), now with its stated interval;
- ``out-of-fold``: the new default, the same target on the out-of-fold scores.

Each row: threshold, promised FPR (mean and 95 % interval), the flagged-good range it
predicts for the test split's good images, the observed test FPR (inside or not),
recall and F1 at the threshold; and the time the out-of-fold models took.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_thresholds.py DATA \\
         [--heads gaussian,knn,flow,gmm] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from vitqc.backbones.cache import FeatureCache
from vitqc.calibration import fit_calibration
from vitqc.data.layouts import load_dataset
from vitqc.metrics import f1_precision_recall
from vitqc.pipeline import FitOptions, fit, score_samples
from vitqc.report.evaluation import threshold_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--heads", default="gaussian,knn,flow,gmm")
    parser.add_argument("--category", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # the rows below say what each rule did
    dataset = load_dataset(args.data, category=args.category, seed=0)
    labels = np.array([s.label for s in dataset.test])
    cache = FeatureCache(args.cache_dir)
    rows = []
    print(
        f"{dataset.name}: {len(dataset.train)} train + {len(dataset.val)} val good; test "
        f"{int((labels == 0).sum())} good + {int(labels.sum())} defective",
        flush=True,
    )
    header = (
        f"{'head':9} {'rule':12} {'n':>4} {'threshold':>10} {'promised FPR (95%)':>23} "
        f"{'flag good':>9} {'observed':>12} {'in':>3} {'recall':>6} {'F1':>6}"
    )
    for head in args.heads.split(","):
        start = time.perf_counter()
        options = FitOptions(head=head, cache_dir=args.cache_dir, progress=False)
        model, report = fit(dataset, options)
        fit_seconds = time.perf_counter() - start
        scores, _ = score_samples(model, dataset.test, cache=cache)
        val_scores, _ = score_samples(model, dataset.val, cache=cache)
        rules = {
            "validation": fit_calibration(val_scores),
            "out-of-fold": report.calibration,
        }
        oof = report.out_of_fold or {}
        print(
            f"\n{head}: fit {fit_seconds:.0f} s, of which out-of-fold models "
            f"{oof.get('seconds', 0):.0f} s ({oof.get('folds')} folds); chosen "
            f"{report.chosen or 'as given'}",
            flush=True,
        )
        print(header)
        for rule, cal in rules.items():
            flagged = scores > cal.threshold
            check = threshold_check(cal, labels, flagged)
            f1 = f1_precision_recall(labels, scores, cal.threshold)[0]
            lo, hi = check["fpr_interval"]
            a, b = check["flagged_good_interval"]
            row = {
                "dataset": dataset.name,
                "head": head,
                "rule": rule,
                "n_normal": cal.n_normal,
                "threshold": cal.threshold,
                "target_fpr": cal.target_fpr,
                "expected_fpr": cal.expected_fpr,
                "fpr_interval": [lo, hi],
                "flagged_good_interval": [a, b],
                "flagged_good": check["flagged_good"],
                "observed_fpr": check["observed_fpr"],
                "inside": check["fpr_inside"],
                "recall": check["recall"],
                "f1": f1,
                "fit_seconds": fit_seconds,
                "oof_seconds": oof.get("seconds"),
            }
            rows.append(row)
            print(
                f"{head:9} {rule:12} {cal.n_normal:4d} {cal.threshold:10.4g} "
                f"{cal.expected_fpr:7.2%} ({lo:5.2%}-{hi:5.2%}) {a:4d}-{b:<4d} "
                f"{check['flagged_good']:3d} {check['observed_fpr']:7.2%} "
                f"{'yes' if check['fpr_inside'] else 'NO':>3} {check['recall']:6.3f} {f1:6.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
