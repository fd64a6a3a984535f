"""Memory an exported model holds in ``vitqc.runtime.ExportedModel``, one process per
file (no torch imported): resident set size over the process's own after the imports, when
loaded, after a single image, after a batch (the graph split at its feature maps, the
parts replacing the whole graph's session), and after a single image again; beside it the
file's size, which is mostly the model's constants.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_runtime_memory.py MODEL.onnx...
         [--batch 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

_CHILD = """
import sys
import numpy as np
import psutil
from vitqc.runtime import ExportedModel

def rss_mb():
    return psutil.Process().memory_info().rss / 2**20

base = rss_mb()
model = ExportedModel(sys.argv[1], threads=1)
figures = [rss_mb() - base]
rng = np.random.default_rng(0)
for n in (1, int(sys.argv[2]), 1):
    model.run(rng.random((n, 3, *model.input_size), dtype=np.float32))
    figures.append(rss_mb() - base)
print(" ".join(f"{f:.0f}" for f in figures))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", type=Path, nargs="+", help="exported .onnx files")
    parser.add_argument("--batch", type=int, default=8, help="images in the batch step")
    args = parser.parse_args()
    print(
        f"{'model':<32} {'file MB':>8} {'loaded':>7} {'1 image':>8} "
        f"{f'batch {args.batch}':>8} {'1 image':>8}   (MB over the imports)"
    )
    for path in args.models:
        if not path.is_file():
            sys.exit(f"error: model file not found: {path}")
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), str(args.batch)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"error: {path}: {out.stderr.strip().splitlines()[-1]}")
        loaded, one, batch, again = out.stdout.split()
        size = path.stat().st_size / 2**20
        print(f"{path.name:<32} {size:8.0f} {loaded:>7} {one:>8} {batch:>8} {again:>8}")


if __name__ == "__main__":
    main()
