"""Inference speed: torch beside ONNX Runtime, ms per image at batch 1 and 32, backbone
alone and the full model (backbone + head + maps + calibration), and the ratios issue 19
sets goals for.

Fits each head briefly on a small synthetic dataset (latency does not depend on how well
a head is trained), exports it with ``vitqc.export`` (and the preprocessing + backbone
alone the same way), then times both with vitqc's own latency probe (median of repeats).
ONNX Runtime gets as many threads as torch; both run a batch as vitqc does: the backbone
in micro-batches (``backbones.extractor.MICRO_BATCH``; in ONNX Runtime the size
``runtime.fastest_micro_batch`` times once) and the head on the whole batch (the full
model through ``runtime.ExportedModel.run``, the backbone alone in its own session). With
``--data``
the timed batches are that dataset's test images (resized to the input size) instead of
synthetic ones, and the heads are fitted on it; ``--bundle HEAD=DIR`` times an already
fitted model instead (e.g. a knn model with the dataset's full memory bank). A head may be a variant
(``knn:search=faiss-hnsw``). The exported graph searches as ``export_search`` says.

Printed per model: ms per image, and the full model over the backbone alone ("x bb") at
batch 1 and 32 in each runtime. The backbone alone is timed again beside every model, in
turn with it for ``--rounds`` rounds: the ratio is the median of each round's ratio (and
the ms the medians), so the machine's drift between models does not fall on the ratio
(one timing of the backbone for all models moved by 10-40 % from run to run). The goals:
the head adds at most 15 % (knn, gmm, gaussian), the flow at most its share of the FLOPs
plus 15 % (FLOPs of backbone and head printed, counted by ``torch.utils.flop_counter``),
and batch 32 per image not above batch 1. For the density heads, which read every
constant once per call, it also prints the head's constants (torch state and exported
graph) and the batch-1 ratio that reading them at this machine's memory speed (a sum over
256 MB, the same threads) allows at best: the backbone evicts them from cache. Run:
.venv/bin/python benchmarks/bench_inference.py [--backbone NAME] [--heads flow,gmm,knn]
    [--layers 7] [--image-size 448]
    [--data ../shared/data/kolektorsdd --cache-dir DIR] [--bundle knn=DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitqc.bench.timing import measure_latency, time_per_image_ms
from vitqc.bundle import load_bundle
from vitqc.data.io import load_image
from vitqc.data.layouts import load_dataset
from vitqc.data.synth import generate_synthetic
from vitqc.data.transforms import resize_batch
from vitqc.export import export_onnx, trace_to_onnx
from vitqc.heads import parse_head
from vitqc.heads.neighbours import export_search, resolve_search
from vitqc.pipeline import FitOptions, fit
from vitqc.runtime import (
    ExportedModel,
    fastest_micro_batch,
    feature_names,
    run_in_chunks,
    split_graph,
)
from vitqc.scoring import AnomalyModel

BATCHES = (1, 32)
RUNTIMES = ("torch", "onnxrt")
PARTS = ("torch backbone", "torch", "onnxrt backbone", "onnxrt")
SEARCH_OPTIONS = {"search", "ef_search", "nprobe", "search_dims"}


class _Backbone(nn.Module):
    """Preprocessing + frozen backbone: what the "backbone" rows time."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.preprocessor, self.extractor = model.preprocessor, model.extractor

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(self.preprocessor(image))


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export_backbone(model: AnomalyModel, path: Path) -> Path:
    """The backbone alone, traced as ``vitqc.export`` traces a model."""
    trace_to_onnx(_Backbone(model).eval(), torch.rand(2, 3, *model.input_size), path)
    return path


def _ort_timer(run: Callable[[np.ndarray], object], images: torch.Tensor):
    """A function timing ``run`` in ms per image at each of ``BATCHES``."""
    return lambda: {
        bs: time_per_image_ms(
            lambda t: run(t.numpy()),
            images[torch.arange(bs) % images.shape[0]],
            min_seconds=2.0,
            min_repeats=5,
        )
        for bs in BATCHES
    }


def _backbone_runner(path: Path, input_size: tuple[int, int]) -> Callable[[np.ndarray], object]:
    """The exported backbone alone, in the micro-batch it runs fastest in (chosen once)."""
    session = _session(path)
    chunk = fastest_micro_batch(session, input_size)
    return lambda batch: run_in_chunks(session, batch, chunk)


def _row(name: str, ms: dict[int, float], ratios: tuple[float, ...] | None, goal: str = "") -> str:
    ratios = "" if ratios is None else "".join(f"{r:>9.2f}" for r in ratios)
    b32_ok = "yes" if ms[32] <= ms[1] else "NO"
    return f"{name:<40}{ms[1]:>9.2f}{ms[32]:>9.2f}{ratios or ' ' * 18}{b32_ok:>10}  {goal}"


def _int_mm_flops(a_shape: torch.Size, b_shape: torch.Size, *args, **kwargs) -> int:
    """FLOPs of ``torch._int_mm`` (the int8 search's products), which the counter does
    not know: two per multiply-add, as for ``mm``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _flops(fn, *args) -> int:
    mapping = {torch.ops.aten._int_mm: _int_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def _memory_gb_per_s(megabytes: int = 256) -> float:
    """Memory read speed in GB/s: a sum over a tensor far larger than the caches."""
    values = torch.ones(megabytes * 2**20 // 4)
    values.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        values.sum()
        times.append(time.perf_counter() - start)
    return values.numel() * 4 / statistics.median(times) / 1e9


def _constant_bytes(model: AnomalyModel, onnx_path: Path, n_features: int) -> tuple[int, int]:
    """Bytes of the head's constants: its torch state, and the exported graph's head part
    (``runtime.split_graph``): its initializers and ``Constant`` nodes."""
    state = sum(t.numel() * t.element_size() for t in model.head.state_dict().values())
    head = split_graph(onnx_path, feature_names(n_features))[1].graph
    tensors = [*head.initializer]
    tensors += [a.t for node in head.node if node.op_type == "Constant" for a in node.attribute]
    return state, sum(numpy_helper.to_array(t).nbytes for t in tensors if t.dims)


def _goal(head: str, ratios: tuple[float, float], flops_share: float) -> str:
    limit = 1.15 + (flops_share if head == "flow" else 0.0)
    met = "met" if max(ratios) <= limit else "NOT met"
    return f"goal x bb <= {limit:.2f}: {met}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--heads", default="flow,gmm,knn")
    parser.add_argument("--layers", default=None, help="blocks/stages to read, e.g. 7 or 2,3")
    parser.add_argument("--image-size", type=int, default=None, help="input size in pixels")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="time on this dataset's test images (default: synthetic)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder")
    parser.add_argument(
        "--bundle", action="append", default=[], help="HEAD=DIR: time this fitted model"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timings of each model beside its backbone"
    )
    args = parser.parse_args()
    bundles = dict(item.split("=", 1) for item in args.bundle)
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    print(f"torch threads: {torch.get_num_threads()} (ONNX Runtime {ort.__version__}: the same)")
    memory_speed = _memory_gb_per_s()
    print(f"memory read speed: {memory_speed:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or generate_synthetic(
            Path(tmp) / "data", n_train=40, n_test_good=2, n_test_defective=2, size=224, seed=0
        )
        dataset = load_dataset(root)
        print(f"images: {len(dataset.test[:32])} test images of {root}, resized to the input size")
        print(f"{'model':<40}{'ms b1':>9}{'ms b32':>9}{'x bb b1':>9}{'x bb b32':>9}{'b32<=b1':>10}")
        ort_backbone = None
        for head in args.heads.split(","):
            name, options = parse_head(head)
            if head in bundles or (name in bundles and set(options) <= SEARCH_OPTIONS):
                # a search variant of a fitted knn model: the same bank, searched otherwise
                model, _ = load_bundle(bundles.get(head, bundles.get(name)))
                if options:
                    model.head.set_search(options.pop("search", model.head.search), **options)
            else:
                opts = FitOptions(
                    backbone=args.backbone,
                    layers=layers,
                    image_size=args.image_size,
                    head=name,
                    head_options=options,
                    epochs=2,
                    patience=2,
                    folds=0,
                    cache_dir=args.cache_dir or Path(tmp) / "cache",
                    progress=False,
                )
                model, _ = fit(dataset, opts)
            model.eval()
            images = resize_batch([load_image(x) for x in dataset.test[:32]], model.input_size)
            onnx_path = export_onnx(model, Path(tmp) / f"{name}.onnx", {})
            first = ort_backbone is None
            if first:  # every model shares the backbone and input size
                path = _export_backbone(model, Path(tmp) / "backbone.onnx")
                ort_backbone = _ort_timer(_backbone_runner(path, model.input_size), images)
            # as vitqc.runtime runs it: a batch's backbone in micro-batches, its head on
            # the whole batch
            runtime_model = ExportedModel(onnx_path, threads=torch.get_num_threads())
            ort_full = _ort_timer(runtime_model.run, images)
            rounds: dict[str, list[dict[int, float]]] = {k: [] for k in PARTS}
            for _ in range(args.rounds):  # each model beside its backbone, in turn
                lat = measure_latency(model, BATCHES, min_seconds=2.0, min_repeats=5, images=images)
                rounds["torch backbone"].append({b: lat[f"backbone_ms_b{b}"] for b in BATCHES})
                rounds["torch"].append({b: lat[f"pipeline_ms_b{b}"] for b in BATCHES})
                rounds["onnxrt backbone"].append(ort_backbone())
                rounds["onnxrt"].append(ort_full())
            ms = {
                k: {b: statistics.median(r[b] for r in runs) for b in BATCHES}
                for k, runs in rounds.items()
            }
            # per image, counted on two: a single image's per-position whitening is
            # products and sums (heads.base), which the counter does not see as FLOPs
            features = model.features(images[:2])
            bb_flops = _flops(_Backbone(model), images[:2]) / 2
            share = _flops(model.head, features) / 2 / bb_flops  # faiss searches: not counted
            if first:
                print(f"backbone FLOPs per image: {bb_flops / 1e9:.2f} G")
                for runtime in RUNTIMES:
                    name_bb = f"{model.extractor.name} (backbone) {runtime}"
                    print(_row(name_bb, ms[f"{runtime} backbone"], None))
            mode = getattr(model.head, "search", None)
            search = resolve_search(mode or "exact")
            counted = " (faiss: n/a)" if search.startswith("faiss") else ""
            print(f"  {head}: head FLOPs {share:.1%} of the backbone's{counted}")
            if mode is None:  # a search reads its float32 bank only at its candidates
                constants = _constant_bytes(model, onnx_path, len(features))
                floors = [
                    1 + size / (memory_speed * 1e6) / ms[f"{runtime} backbone"][1]
                    for size, runtime in zip(constants, RUNTIMES, strict=True)
                ]
                print(
                    f"  {head}: head constants {constants[0] / 1e6:.1f} MB (torch), "
                    f"{constants[1] / 1e6:.1f} MB (graph); read once per call they bound "
                    f"x bb at b1 to >= {floors[0]:.2f} (torch), {floors[1]:.2f} (onnxrt)"
                )
            for runtime in RUNTIMES:
                if mode is not None:  # the knn's search in each runtime
                    runtime_search = export_search(mode) if runtime == "onnxrt" else search
                    label = f"  + {head} ({runtime_search} search) {runtime}"
                else:
                    label = f"  + {head} {runtime}"
                full, bb = rounds[runtime], rounds[f"{runtime} backbone"]
                ratios = tuple(
                    statistics.median(f[b] / g[b] for f, g in zip(full, bb, strict=True))
                    for b in BATCHES
                )
                goal = _goal(name, ratios, share)
                print(_row(label, ms[runtime], ratios, goal))


if __name__ == "__main__":
    main()
