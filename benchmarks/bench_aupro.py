"""Time and peak memory of ``aupro`` and ``pixel_auroc`` at MVTec bottle size.

100 random 900x900 float32 maps (the size of MVTec AD bottle masks), half of them with a
few random elliptical defect blobs whose pixels score higher on average. Prints wall time
and two memory figures per metric: the tracemalloc peak (numpy's own allocations, i.e. the
metric's working memory beyond the inputs) and the growth of the process's maximum
resident set size.

Run: ``.venv/bin/python benchmarks/bench_aupro.py [--n 100] [--size 900]``
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc

import numpy as np

from vitqc.metrics import aupro, pixel_auroc


def make_data(n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks, maps = [], []
    for i in range(n):
        mask = np.zeros((size, size), dtype=bool)
        if i % 2 == 1:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(0, size, 2)
                ry, rx = rng.integers(size // 60, size // 8, 2)
                mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        amap = rng.random((size, size), dtype=np.float32)
        amap[mask] += rng.random(int(mask.sum()), dtype=np.float32) * 0.8
        masks.append(mask)
        maps.append(amap)
    return masks, maps


def max_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def measure(name: str, fn, *args) -> None:
    rss_before = max_rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    value = fn(*args)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = max_rss_mib() - rss_before
    print(
        f"{name:12s} value={value:.6f}  time={elapsed:6.2f} s  "
        f"tracemalloc peak={peak / 2**20:7.1f} MiB  max RSS growth={rss_growth:7.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=900)
    args = parser.parse_args()
    masks, maps = make_data(args.n, args.size)
    n_pix = args.n * args.size * args.size
    n_def = sum(int(m.sum()) for m in masks)
    print(
        f"{args.n} maps of {args.size}x{args.size} float32: {n_pix / 1e6:.1f} M pixels, "
        f"{n_def / 1e6:.2f} M defect pixels; inputs {n_pix * 5 / 2**20:.0f} MiB; "
        f"max RSS before metrics {max_rss_mib():.0f} MiB"
    )
    measure("aupro@0.3", aupro, masks, maps, 0.3)
    measure("pixel_auroc", pixel_auroc, masks, maps)


if __name__ == "__main__":
    main()
