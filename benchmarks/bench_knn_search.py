"""Nearest-neighbour search modes of a fitted knn model on real test images.

For each mode (``exact`` is the reference): index build time, recall@1 against exact
search on the test patches, the knn head's time per image at batch 1 and 32 (one
thread; the backbone alone timed the same way for the ratio), and the test metrics
(image AUROC, pixel AUROC, AUPRO) with their change against exact search. Only the
search changes between rows: same bank, same features (read from the feature cache).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_knn_search.py BUNDLE DATA \\
         [--cache-dir DIR] [--modes exact,faiss-flat,faiss-hnsw:ef_search=16,...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from vitqc.backbones.cache import FeatureCache
from vitqc.bench.timing import time_per_image_ms
from vitqc.bundle import load_bundle
from vitqc.data.layouts import load_dataset
from vitqc.heads.neighbours import recall_of
from vitqc.pipeline import score_features
from vitqc.report.evaluation import evaluate_predictions

DEFAULT_MODES = (
    "exact,bfloat16,float32,int8,faiss-flat,faiss-hnsw:ef_search=16,faiss-hnsw:ef_search=32,"
    "faiss-hnsw:ef_search=64,faiss-ivf:nprobe=1,faiss-ivf:nprobe=4,faiss-ivf:nprobe=16"
)
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _set_mode(head, mode: str) -> None:
    search, _, option = mode.partition(":")
    params = {}
    if option:
        key, _, value = option.partition("=")
        params[key] = int(value)
    head.set_search(search, **params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--recall-images", type=int, default=16)
    args = parser.parse_args()

    model, _ = load_bundle(args.bundle)
    model.eval()
    head = model.head
    dataset = load_dataset(args.data)
    test = list(dataset.test)
    features = FeatureCache(args.cache_dir).extract(
        model.extractor, model.preprocessor, test, progress=False
    )
    sel = np.linspace(0, len(test) - 1, args.recall_images).round().astype(int)
    with torch.no_grad():
        emb = head._embeddings([f[sel] for f in features])
    queries = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).numpy()
    bank = head.bank.float().numpy()
    h, w = model.input_size
    x1 = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    x32 = x1.repeat(32, 1, 1, 1)
    bb = {
        1: time_per_image_ms(model.features, x1, min_repeats=5),
        32: time_per_image_ms(model.features, x32),
    }
    print(
        f"{args.data.name}: bank {bank.shape[0]} x {bank.shape[1]}, {len(test)} test images, "
        f"{queries.shape[0]} recall queries; threads {torch.get_num_threads()}; backbone "
        f"{bb[1]:.1f} ms/img (b1), {bb[32]:.1f} ms/img (b32)"
    )
    print(
        f"{'mode':<26}{'build s':>8}{'recall@1':>9}{'head b1':>9}{'head b32':>9}"
        f"{'+bb b1':>8}{'+bb b32':>8}  {'img AUROC':>10}{'px AUROC':>10}{'AUPRO':>8}"
    )
    reference: dict[str, float] | None = None
    for mode in args.modes.split(","):
        _set_mode(head, mode)
        start = time.perf_counter()
        if head.search.startswith("faiss"):
            head.index()
        build = time.perf_counter() - start
        with torch.inference_mode():  # the head's distances, in the queries' order
            found = head([f[sel] for f in features]).flatten().double().pow(2).numpy()
        recall = recall_of(found, queries, bank)
        f1 = [f[:1] for f in features]
        f32 = [f[torch.arange(32) % f.shape[0]] for f in features]
        t1 = _head_ms(head, f1)
        t32 = _head_ms(head, f32)
        scores, maps = score_features(model, features)
        result = evaluate_predictions(test, scores, list(maps), float(model.threshold))
        values = {k: result[k] for k in METRICS}
        reference = reference or values
        delta = "  ".join(f"{values[k] - reference[k]:+.4f}" for k in METRICS)
        print(
            f"{mode:<26}{build:>8.2f}{recall:>9.3f}{t1:>9.2f}{t32:>9.2f}"
            f"{t1 / bb[1]:>8.2f}{t32 / bb[32]:>8.2f}  "
            + "".join(f"{values[k]:>10.4f}" for k in METRICS[:2])
            + f"{values['aupro']:>8.4f}   change {delta}",
            flush=True,
        )


def _head_ms(head, features: list[torch.Tensor]) -> float:
    n = features[0].shape[0]
    times = []
    with torch.inference_mode():
        head(features)
        for _ in range(5):
            start = time.perf_counter()
            head(features)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[2] / n


if __name__ == "__main__":
    main()
