"""The ``vitqc`` command line (typer). Thin: every command calls library functions.

User errors (``VitqcError``) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from vitqc.data.lookalike import MAX_DISTANCE
from vitqc.errors import VitqcError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain click messages: a usage error is a usage line and one "Error: ..." line
    rich_markup_mode=None,
    help="Visual quality control: learn what good parts look like, flag and locate defects.",
)

DataArg = Annotated[Path, typer.Argument(help="dataset folder (MVTec, BTAD, plain folder, MNIST)")]
FormatOpt = Annotated[
    str, typer.Option("--format", help="dataset layout: auto, mvtec, btad, folder, mnist")
]
CategoryOpt = Annotated[
    str | None, typer.Option("--category", help="category, when DATA holds several")
]
BitDepthOpt = Annotated[
    int,
    typer.Option(
        "--bit-depth",
        help="bits per pixel of the camera's grayscale images, 8 to 16: a 12-bit camera's "
        "16-bit files are read with 4095 as white",
    ),
]
NormalClassOpt = Annotated[
    int | None, typer.Option("--normal-class", help="MNIST: the digit that is normal")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for the split and the head")]
MinAreaOpt = Annotated[
    str | None,
    typer.Option(
        "--min-area",
        help="flag an image only when a region above the threshold covers at least this "
        "area: pixels of the original image (50) or mm2 (2.5mm2, with --mm-per-pixel); "
        "fit stores it, predict overrides it (0: off)",
    ),
]
MmPerPixelOpt = Annotated[
    float | None, typer.Option("--mm-per-pixel", help="image scale for --min-area in mm2")
]


def _print_version(value: bool) -> None:
    if value:
        from vitqc import __version__

        typer.echo(f"vitqc {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Visual quality control: learn what good parts look like, flag and locate defects."""


def _echo(text: str) -> None:
    typer.echo(text)


def _load_dataset(data: Path, fmt: str, category: str | None, normal_class: int | None, seed: int):
    from vitqc.data.layouts import load_dataset

    return load_dataset(data, format=fmt, category=category, normal_class=normal_class, seed=seed)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. a target FPR the data cannot support) as one line."""
    typer.echo(f"warning: {message}", err=True)


def _parse_layers(layers: str | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    try:
        return tuple(int(x) for x in layers.split(",") if x.strip())
    except ValueError as exc:
        raise VitqcError(f"--layers must be comma-separated integers, got {layers!r}") from exc


@app.command()
def fit(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="model directory to write")],
    backbone: Annotated[
        str | None,
        typer.Option(
            help="backbone name (see `vitqc backbones`); default tf_efficientnet_lite0, "
            "pixels for vtadl"
        ),
    ] = None,
    head: Annotated[
        str,
        typer.Option(
            help="flow, gmm, gaussian, knn or vtadl; options as head:option=value joined by + "
            "(e.g. vtadl:patch_size=32+reduction=sum)"
        ),
    ] = "flow",
    layers: Annotated[
        str | None, typer.Option(help="feature layers/blocks, e.g. 2,3 or 7 (DeiT block)")
    ] = None,
    weights: Annotated[
        str, typer.Option(help="default, hub, package, random or a local weights file")
    ] = "default",
    image_size: Annotated[
        int | None, typer.Option(help="input size in pixels (default: the backbone's)")
    ] = None,
    epochs: Annotated[int, typer.Option(help="maximum epochs")] = 500,
    patience: Annotated[
        int | None,
        typer.Option(
            help="early-stopping patience in epochs (default with --select proxy: 2, 1 for "
            "flow and gmm on EfficientNet-Lite; 30 with loss)"
        ),
    ] = None,
    select: Annotated[
        str,
        typer.Option(
            help="how the epoch is chosen: proxy (localization on synthetic defects pasted "
            "onto the good validation images) or loss (validation NLL)"
        ),
    ] = "proxy",
    statistics: Annotated[
        str,
        typer.Option(
            help="feature statistics: auto (rate per-position and position-free on synthetic "
            "defects, keep the better), position, or free (parts that move between photos)"
        ),
    ] = "auto",
    auto: Annotated[
        bool,
        typer.Option(
            "--auto",
            help="try a small set of models (heads gaussian/knn, layer sets, statistics, image "
            "score), keep the best on synthetic defects; every candidate's figures are printed",
        ),
    ] = False,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="training time budget: stop after the epoch that reaches it"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="default: paper's Table 2")] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(
            help="batches per epoch, from shuffled passes over the training images; the "
            "proxy rates (or the validation loss is taken) once per epoch (default: one pass)"
        ),
    ] = None,
    train_precision: Annotated[
        str,
        typer.Option(
            help="auto (bfloat16 products for the flow where the CPU computes bfloat16 "
            "natively, else float32), float32 or bfloat16 (flow only)"
        ),
    ] = "auto",
    lr: Annotated[float | None, typer.Option(help="default: paper's Table 2")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="default: paper's Table 2")] = None,
    components: Annotated[int | None, typer.Option(help="gmm: mixture components")] = None,
    conditioning: Annotated[
        str | None,
        typer.Option(help="gmm: position, shared (on whitened features) or embedding"),
    ] = None,
    flow_steps: Annotated[int | None, typer.Option(help="flow: number of flow steps")] = None,
    hidden_ratio: Annotated[float | None, typer.Option(help="flow: subnet hidden ratio")] = None,
    coreset_ratio: Annotated[float | None, typer.Option(help="knn: coreset ratio")] = None,
    smoothing: Annotated[float, typer.Option(help="Gaussian sigma (px) for maps")] = 4.0,
    image_score: Annotated[
        str,
        typer.Option(help="map -> image score: max (paper), mean, or top:F (mean of top F)"),
    ] = "max",
    target_fpr: Annotated[
        float | None,
        typer.Option(
            help="rule fpr: the fraction of good parts you accept to reject (default 0.01, "
            "or the lowest the good images support)"
        ),
    ] = None,
    threshold_rule: Annotated[
        str,
        typer.Option(
            help="fpr (target false-reject rate on good images), f1 (F1-best on your "
            "labelled defective images, --val-defects) or f1-synthetic (F1-best against "
            "synthetic defects on the validation images)"
        ),
    ] = "fpr",
    threshold_folds: Annotated[
        int,
        typer.Option(
            help="score every good image (train + validation) with a model fitted on the "
            "other folds; the threshold rests on all of them (0: validation images only)"
        ),
    ] = 5,
    val_defects: Annotated[
        Path | None,
        typer.Option(help="folder of defective images (not test images) for --threshold-rule f1"),
    ] = None,
    min_area: MinAreaOpt = None,
    mm_per_pixel: MmPerPixelOpt = None,
    minmax: Annotated[
        bool,
        typer.Option("--minmax/--no-minmax", help="per-channel min-max scaling of the images"),
    ] = True,
    bit_depth: BitDepthOpt = 8,
    cache_dir: Annotated[Path | None, typer.Option(help="feature cache folder")] = None,
    fmt: FormatOpt = "auto",
    category: CategoryOpt = None,
    normal_class: NormalClassOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Train a model on the good training images of DATA and write a model bundle."""
    from vitqc.bundle import save_bundle
    from vitqc.data.io import white_level_for
    from vitqc.decision import parse_min_area
    from vitqc.heads import parse_head
    from vitqc.pipeline import FitOptions, defect_samples
    from vitqc.pipeline import fit as run_fit
    from vitqc.scoring import parse_image_score

    if out.exists() and not out.is_dir():
        raise VitqcError(f"--out {out} exists and is not a directory")
    parse_image_score(image_score)
    white_level_for(bit_depth)  # refuses a depth out of range in one line
    if max_minutes is not None and max_minutes <= 0:
        raise VitqcError(f"--max-minutes must be positive, got {max_minutes}")
    head, head_options = parse_head(head)
    dataset = _load_dataset(data, fmt, category, normal_class, seed)
    for key, value in {
        "n_components": components,
        "conditioning": conditioning,
        "steps": flow_steps,
        "hidden_ratio": hidden_ratio,
        "coreset_ratio": coreset_ratio,
    }.items():
        if value is not None:
            head_options[key] = value
    options = FitOptions(
        backbone=backbone,
        layers=_parse_layers(layers),
        weights=weights,
        image_size=image_size,
        head=head,
        head_options=head_options,
        epochs=epochs,
        patience=patience,
        select=select,
        statistics=statistics,
        auto=auto,
        max_minutes=max_minutes,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        train_precision=train_precision,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        smoothing_sigma=smoothing,
        image_score=image_score,
        minmax=minmax,
        bit_depth=bit_depth,
        target_fpr=target_fpr,
        calibration=threshold_rule,
        folds=threshold_folds,
        val_defects=defect_samples(val_defects) if val_defects is not None else (),
        min_area=parse_min_area(min_area, mm_per_pixel),
        cache_dir=cache_dir,
    )
    start = time.perf_counter()
    model, report = run_fit(dataset, options)
    meta = {
        "dataset": {"root": str(data), "category": dataset.category, "format": dataset.format},
        "fit": report.to_dict(),
    }
    save_bundle(model, out, meta)
    _echo(
        f"fitted {model.head.name} on {model.extractor.name} "
        f"({report.n_train} train / {report.n_val} val images) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    _echo(_describe_threshold(report.calibration))
    if report.out_of_fold:
        oof = report.out_of_fold
        _echo(
            f"out-of-fold scores: {oof['folds']} fold models in {oof['seconds']:.1f} s "
            "(--threshold-folds 0 skips them: the threshold then rests on the validation images)"
        )
    if report.train is not None:
        t = report.train
        rating = (
            ""
            if t.best_rating is None
            else f", proxy {t.best_rating:.4f} (start {t.initial_rating:.4f})"
        )
        _echo(
            f"best epoch {t.best_epoch} of {t.epochs_run} (stopped by {t.stopped}, chosen by "
            f"{report.selection}; steps in {t.precision}), validation loss "
            f"{t.best_val_loss:.4g}{rating}"
        )
    for row in report.candidates:
        mark = "*" if row["candidate"] == report.chosen else " "
        _echo(
            f"{mark} proxy {row['proxy']:.4f} (image {row['image_auroc']:.3f}, pixel "
            f"{row['pixel_auroc']:.3f}, AUPRO {row['aupro']:.3f})  {row['candidate']}"
        )
    if report.candidates:
        _echo(f"chosen on synthetic defects: {report.chosen}")
    if report.proxy is not None:
        p = report.proxy
        _echo(
            f"synthetic-defect validation ({report.n_val} images): image AUROC "
            f"{p['image_auroc']:.3f}, pixel AUROC {p['pixel_auroc']:.3f}, "
            f"AUPRO {p['aupro']:.3f} (proxy {p['proxy']:.3f})"
        )
    _echo(f"model written to {out}")


def _describe_threshold(cal) -> str:
    from vitqc.calibration import INTERVAL_LEVEL
    from vitqc.report.evaluation import describe_rule

    text = f"threshold {cal.threshold:.4g} ({describe_rule(cal)}); from {cal.n_normal} "
    text += f"{cal.normal_source} good-image scores"
    if cal.fpr_interval is not None:
        lo, hi = cal.fpr_interval
        text += (
            f": a new good part is rejected with probability {cal.expected_fpr:.2%} "
            f"({INTERVAL_LEVEL:.0%} interval {lo:.2%}-{hi:.2%})"
        )
    return text


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="model directory from `vitqc fit`")],
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="metrics JSON to write")] = Path(
        "metrics.json"
    ),
    maps: Annotated[Path | None, typer.Option(help="write one figure per test image here")] = None,
    weights: Annotated[str | None, typer.Option(help="override the backbone weights")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="feature cache folder")] = None,
    fmt: FormatOpt = "auto",
    category: CategoryOpt = None,
    normal_class: NormalClassOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Score the test split of DATA and report image/pixel AUROC, AUPRO, PR-AUC, F1."""
    from vitqc.backbones.cache import FeatureCache
    from vitqc.bundle import load_bundle
    from vitqc.decision import decide
    from vitqc.pipeline import score_samples, write_evaluation_figures
    from vitqc.report.evaluation import (
        evaluate_predictions,
        format_metrics_table,
        format_threshold_check,
        original_shape,
        threshold_check,
        write_metrics_json,
    )

    model, config = load_bundle(model_dir, weights=weights)
    dataset = _load_dataset(data, fmt, category, normal_class, seed)
    if not dataset.test:
        raise VitqcError(f"no test images found in {data}")
    cache = FeatureCache(cache_dir)
    start = time.perf_counter()
    scores, score_maps = score_samples(model, dataset.test, cache=cache)
    min_area = float(model.min_area)
    sizes = [original_shape(s) for s in dataset.test] if min_area else None
    flagged, _ = decide(scores, score_maps, float(model.threshold), min_area, sizes)
    result = evaluate_predictions(
        dataset.test,
        scores,
        list(score_maps) if dataset.has_masks else None,
        float(model.threshold),
        flagged=flagged,
    )
    result["model"] = str(model_dir)
    result["data"] = str(data)
    result["category"] = dataset.category
    result["seconds"] = time.perf_counter() - start
    calibration = model.calibration
    result["threshold_rule"] = calibration.method if calibration is not None else None
    if calibration is not None:
        labels = [s.label for s in dataset.test]
        result["threshold_check"] = threshold_check(calibration, labels, flagged)
    write_metrics_json(out, result)
    _echo(format_metrics_table(result))
    if calibration is not None:
        _echo(format_threshold_check(result["threshold_check"]))
    if maps is not None:
        write_evaluation_figures(model, dataset.test, score_maps, maps)
        _echo(f"figures written to {maps}")
    _echo(f"metrics written to {out}")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="model directory from `vitqc fit`")],
    inputs: Annotated[list[Path], typer.Argument(help="images or folders of images")],
    out: Annotated[Path, typer.Option("--out", help="folder for overlays and summaries")],
    weights: Annotated[str | None, typer.Option(help="override the backbone weights")] = None,
    min_area: MinAreaOpt = None,
    mm_per_pixel: MmPerPixelOpt = None,
) -> None:
    """Score new images: decision at the stored threshold, heat-map overlays, CSV/JSON."""
    from vitqc.atomic import write_json, write_text
    from vitqc.bundle import load_bundle
    from vitqc.decision import parse_min_area
    from vitqc.pipeline import predict_images

    area = None if min_area is None else parse_min_area(min_area, mm_per_pixel)
    model, _ = load_bundle(model_dir, weights=weights)
    rows = predict_images(model, inputs, out, min_area=area)
    write_json(out / "predictions.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "predictions.csv", buf.getvalue())
    n_bad = sum(r["defective"] for r in rows)
    _echo(f"{len(rows)} images scored, {n_bad} flagged defective; results in {out}")


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="model directory from `vitqc fit`")],
    out: Annotated[Path, typer.Option("--out", help="the ONNX file to write (MODEL.onnx)")],
    weights: Annotated[str | None, typer.Option(help="override the backbone weights")] = None,
) -> None:
    """Export a model as one ONNX file (preprocessing, backbone, head, calibration) for
    `python -m vitqc.runtime`, which scores images without torch."""
    from vitqc.export import export_bundle

    if out.is_dir():
        raise VitqcError(f"--out {out} is a directory: name the ONNX file, e.g. {out}/model.onnx")
    path = export_bundle(model_dir, out, weights=weights)
    _echo(f"ONNX model written to {path}; run it with: python -m vitqc.runtime {path} IMAGES")


@app.command()
def serve(
    model: Annotated[
        Path, typer.Argument(help="model directory from `vitqc fit` or MODEL.onnx from export")
    ],
    host: Annotated[
        str, typer.Option(help="address to listen on (0.0.0.0: every network)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port)")] = 8000,
    workers: Annotated[int, typer.Option(help="inference workers (images scored at once)")] = 1,
    max_queue: Annotated[
        int, typer.Option(help="requests waiting for a worker; beyond: 503 with Retry-After")
    ] = 8,
    threads: Annotated[
        int | None, typer.Option(help="onnxruntime threads per worker (default: cores/workers)")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="VITQC_API_KEY",
            show_envvar=True,
            help="require this key (header X-API-Key) on /predict, /predict/batch, /model",
        ),
    ] = None,
    log_results: Annotated[
        Path | None, typer.Option(help="append every decision to this file as a JSON line")
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="largest request body (413 above)")] = 20.0,
    max_pixels: Annotated[
        int, typer.Option(help="largest image, width x height from its header (413 above)")
    ] = 40_000_000,
) -> None:
    """Serve a model over HTTP: POST /predict, /predict/batch; GET /health, /model, /docs."""
    from vitqc.serve.server import run_server

    run_server(
        model,
        echo=_echo,
        host=host,
        port=port,
        workers=workers,
        max_queue=max_queue,
        threads=threads,
        api_key=api_key,
        log_results=log_results,
        max_body_mb=max_body_mb,
        max_pixels=max_pixels,
    )


@app.command()
def inspect(
    data: DataArg,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    fmt: FormatOpt = "auto",
    category: CategoryOpt = None,
    bit_depth: BitDepthOpt = 8,
    lookalike: Annotated[
        int,
        typer.Option(
            "--lookalike",
            help="bits of 256 within which a test image's perceptual hash counts as the same "
            "part as a training image's (0: identical hashes only)",
        ),
    ] = MAX_DISTANCE,
    figures: Annotated[
        Path | None,
        typer.Option(
            help="folder for a picture of each defective test image beside the good training "
            "image that looks like it"
        ),
    ] = None,
) -> None:
    """Open every image and mask of DATA and report what was found: unreadable files, masks
    that do not fit, training copies, and test images that show a training image's part."""
    from vitqc.data.inspect import format_inspection, inspect_dataset, write_lookalike_figures

    if figures is not None and figures.exists() and not figures.is_dir():
        raise VitqcError(f"cannot write the figures to {figures}: it is a file, not a folder")
    report = inspect_dataset(
        data, format=fmt, category=category, bit_depth=bit_depth, lookalike=lookalike
    )
    _echo(json.dumps(report, indent=2, default=str) if as_json else format_inspection(report))
    if figures is not None:
        written = write_lookalike_figures(report, figures, bit_depth)
        typer.echo(f"{len(written)} lookalike pictures written to {figures}", err=True)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder to write the dataset into")],
    n_train: Annotated[int, typer.Option(help="good training images")] = 60,
    n_test_good: Annotated[int, typer.Option(help="good test images")] = 20,
    n_test_defective: Annotated[int, typer.Option(help="defective test images")] = 30,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 256,
    seed: SeedOpt = 0,
) -> None:
    """Generate a synthetic MVTec-layout dataset of textured parts with real defects."""
    from vitqc.data.synth import generate_synthetic

    path = generate_synthetic(
        out,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defective=n_test_defective,
        size=size,
        seed=seed,
    )
    _echo(f"synthetic dataset written to {path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the demo writes its outputs")] = Path(
        "vitqc-demo"
    ),
    head: Annotated[str, typer.Option(help="flow, gmm or knn")] = "flow",
    epochs: Annotated[int, typer.Option(help="maximum epochs")] = 40,
) -> None:
    """Generate the embedded synthetic dataset, fit the default model offline, evaluate."""
    from vitqc.demo import run_demo

    run_demo(out, head=head, epochs=epochs, echo=_echo)


@app.command()
def backbones(
    details: Annotated[
        bool, typer.Option(help="instantiate each backbone for parameters and feature shapes")
    ] = True,
) -> None:
    """List the registered backbones with parameter counts and feature shapes."""
    from vitqc.backbones.registry import format_backbone_table

    _echo(format_backbone_table(details=details))


def _register_bench_commands() -> None:
    from vitqc.cli_bench import register

    register(app)


_register_bench_commands()


def main() -> None:
    """Console entry point. Usage errors are click's own (usage line + message, exit 2);
    vitqc's errors print one line and exit 2; neither shows a traceback."""
    warnings.showwarning = _show_warning
    try:
        app()  # standalone mode: click prints usage errors and exits with their code
    except VitqcError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
