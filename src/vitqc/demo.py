"""`vitqc demo`: the embedded default, end to end and offline.

Generates the synthetic dataset, fits the default model (EfficientNet-Lite0 with its
packaged ImageNet weights), evaluates on the test split and writes figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vitqc.backbones.cache import FeatureCache
from vitqc.bundle import save_bundle
from vitqc.data.layouts import load_dataset
from vitqc.data.synth import generate_synthetic
from vitqc.pipeline import FitOptions, fit, score_samples, write_evaluation_figures
from vitqc.report.evaluation import (
    evaluate_predictions,
    format_metrics_table,
    format_threshold_check,
    threshold_check,
    write_metrics_json,
)


def run_demo(
    out: Path, head: str = "flow", epochs: int = 40, echo: Callable[[str], None] = print
) -> dict:
    out = Path(out)
    start = time.perf_counter()
    data_root = out / "data"
    if not (data_root / "tile").is_dir():
        echo(f"generating the synthetic dataset in {data_root} ...")
        generate_synthetic(data_root, seed=0)
    dataset = load_dataset(data_root, category="tile")
    cache = FeatureCache(out / "cache")
    options = FitOptions(head=head, epochs=epochs, cache_dir=out / "cache")
    echo(f"fitting {head} on tf_efficientnet_lite0 (packaged ImageNet weights, offline) ...")
    model, report = fit(dataset, options)
    save_bundle(model, out / "model", {"fit": report.to_dict()})
    scores, maps = score_samples(model, dataset.test, cache=cache)
    result = evaluate_predictions(dataset.test, scores, list(maps), float(model.threshold))
    labels = [s.label for s in dataset.test]
    result["threshold_check"] = threshold_check(
        report.calibration, labels, scores > float(model.threshold)
    )
    write_metrics_json(out / "metrics.json", result)
    write_evaluation_figures(model, dataset.test, maps, out / "maps")
    echo(format_metrics_table(result))
    echo(format_threshold_check(result["threshold_check"]))
    echo(f"model:   {out / 'model'}")
    echo(f"metrics: {out / 'metrics.json'}")
    echo(f"figures: {out / 'maps'}")
    echo(f"demo finished in {time.perf_counter() - start:.0f} s")
    return result
