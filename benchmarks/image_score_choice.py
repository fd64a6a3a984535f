"""Which image score separates good from defective best, on a dataset's test split.

Loads a model bundle, scores the test images once and prints the image AUROC (overall
and per defect type) of every candidate: the map maximum (the papers' score), the map
mean, and for VT-ADL each loss term and the training loss (the VT-ADL paper's score).
A benchmark, not a tuning tool: the test split decides nothing that ships.

    .venv/bin/python benchmarks/image_score_choice.py MODEL_DIR ../shared/data/magnetic_tile \\
        --out /tmp/score_choice.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vitqc.bundle import load_bundle
from vitqc.data.layouts import load_dataset
from vitqc.metrics import image_auroc
from vitqc.pipeline import image_score_candidates


def auroc_table(samples, candidates: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{candidate: {"all": auroc, defect_type: auroc, ...}}`` (each type against good)."""
    labels = np.array([s.label for s in samples])
    types = np.array([s.defect_type for s in samples])
    good = labels == 0
    table: dict[str, dict[str, float]] = {}
    for name, scores in candidates.items():
        row = {"all": image_auroc(labels, scores)}
        for t in sorted(set(types[~good])):
            pick = good | (types == t)
            row[t] = image_auroc(labels[pick], scores[pick])
        table[name] = row
    return table


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--category", default=None)
    ap.add_argument("--format", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_bundle(args.model)
    dataset = load_dataset(args.data, category=args.category, format=args.format, seed=args.seed)
    table = auroc_table(dataset.test, image_score_candidates(model, dataset.test))
    columns = list(next(iter(table.values())))
    print("image AUROC  " + "  ".join(f"{c:>9}" for c in columns))
    for name, row in table.items():
        print(f"{name:<12} " + "  ".join(f"{row[c]:9.3f}" for c in columns))
    if args.out:
        args.out.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
