"""One small benchmark grid with the local executor and on Ray with 2 workers: wall times.

The grid: synthetic categories (MVTec layout) x one backbone x a few heads, so that it
has one Ray task per category (features extracted once per task, the heads share
them). The local executor runs the cells one after the other in this process; the Ray
executor runs one task per category on a Ray instance started here with 2 CPUs (one
per task, one torch thread each), the driver writing each row as it arrives. Both write
their own database; the script checks that they hold the same metrics and prints:

    local: wall time; ray: start-up of Ray, wall time of the grid, speed-up

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py [--categories 2]
Defaults to ``tf_efficientnet_lite0`` (packaged weights, offline) with gaussian, knn and
gmm at its 224 px input; ``--backbone test_resnet --weights random`` is a quicker grid.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from vitqc.bench.executors import RayExecutor, use_private_token  # noqa: E402
from vitqc.bench.grid import BackboneChoice, GridSpec, expand_grid, run_grid  # noqa: E402
from vitqc.bench.store import open_store  # noqa: E402
from vitqc.data.synth import generate_synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--categories", type=int, default=2, help="synthetic categories")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--heads", default="gaussian,knn,gmm")
    parser.add_argument("--images", type=int, default=24, help="good training images")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs (one per task)")
    args = parser.parse_args()

    import ray

    use_private_token()  # the Ray instance started below: no ~/.ray/auth_token written
    with tempfile.TemporaryDirectory(prefix="vb") as tmp:
        root = Path(tmp) / "data"
        for i in range(args.categories):
            generate_synthetic(
                root,
                category=f"cat{i}",
                n_train=args.images,
                n_test_good=6,
                n_test_defective=6,
                size=224,
                seed=i,
            )
        spec = GridSpec(
            data=[root],
            backbones=[BackboneChoice(args.backbone, weights=args.weights)],
            heads=[h.strip() for h in args.heads.split(",")],
            epochs=3,
            patience=2,
            timing=False,
        )
        cells = expand_grid(spec)
        print(
            f"grid: {len(cells)} cells ({args.categories} categories x {args.backbone} x "
            f"{len(spec.heads)} heads), {os.cpu_count()} cores, "
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, load "
            f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}, {platform.processor() or ''}"
        )

        start = time.perf_counter()
        local = run_grid(
            spec, Path(tmp) / "local.sqlite", cache_dir=Path(tmp) / "c1", progress=False
        )
        local_s = time.perf_counter() - start
        print(f"local: {local_s:7.1f} s wall ({local.ok} cells ok, one after the other)")

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="warning")
        startup_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            remote = run_grid(
                spec,
                Path(tmp) / "ray.sqlite",
                cache_dir=Path(tmp) / "c2",
                progress=False,
                executor=RayExecutor(cpus_per_task=1),
            )
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        print(
            f"ray:   {ray_s:7.1f} s wall ({remote.ok} cells ok, {args.workers} workers; "
            f"Ray start-up {startup_s:.1f} s not included), speed-up {local_s / ray_s:.2f}x"
        )

        with open_store(Path(tmp) / "local.sqlite") as a, open_store(Path(tmp) / "ray.sqlite") as b:
            ref = {r["cell_key"]: r for r in a.runs()}
            differ = [
                f"{r['category']} {r['head']}: "
                + ", ".join(
                    f"{k} {ref[r['cell_key']][k]} vs {r[k]}"
                    for k in ("image_auroc", "pixel_auroc", "aupro", "threshold", "threads")
                    if ref[r["cell_key"]][k] != r[k]
                )
                for r in b.runs()
                if ref[r["cell_key"]]["metrics"] != r["metrics"]
            ]
        print(f"same metrics in both databases: {not differ}")
        for line in differ:
            print(f"  differs: {line}")


if __name__ == "__main__":
    main()
