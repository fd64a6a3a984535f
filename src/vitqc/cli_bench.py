"""``vitqc benchmark | tables | recommend | report``: the benchmark commands.

Kept apart from ``cli.py`` so the main CLI stays small; ``cli.py`` calls
``register(app)``. Every command is thin: it parses options and calls ``vitqc.bench``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from vitqc.errors import VitqcError

DbArg = Annotated[Path, typer.Argument(help="results database written by `vitqc benchmark`")]


def _parse_backbone_weights(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise VitqcError(f"--backbone-weights expects NAME=SOURCE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def benchmark(
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", help="dataset root (repeatable); all its categories are used"),
    ] = None,
    backbones: Annotated[
        str | None,
        typer.Option(
            help="comma-separated backbones, NAME, NAME:LAYERS or NAME:LAYERS@SIZE (e.g. "
            "resnet50:3+4, vit_small_patch14_dinov2:7@448)"
        ),
    ] = None,
    heads: Annotated[
        str | None,
        typer.Option(
            help="comma-separated heads: flow,gmm,knn,vtadl; a variant is head:option=value "
            "(e.g. gmm:conditioning=embedding), options joined by +"
        ),
    ] = None,
    categories: Annotated[
        str | None, typer.Option(help="comma-separated categories (default: all)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs per head")] = None,
    patience: Annotated[int | None, typer.Option(help="early-stopping patience")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="training time budget per cell (minutes)")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="backbone weights: default, hub, package, random or a file")
    ] = None,
    backbone_weights: Annotated[
        list[str] | None,
        typer.Option(help="weights for one backbone, NAME=SOURCE (repeatable; e.g. EsViT)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed for the split and the heads")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="input size for every backbone (default: each one's own)")
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(help="out-of-fold threshold folds (default: fit's; 0: validation only)"),
    ] = None,
    image_score: Annotated[
        str | None, typer.Option(help="map -> image score: max (default), mean or top:F")
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="dataset layout (auto)")] = None,
    bit_depth: Annotated[
        int | None,
        typer.Option(help="bits per pixel of the camera's grayscale images, 8 (default) to 16"),
    ] = None,
    db: Annotated[Path | None, typer.Option(help="results database (results.sqlite)")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML file with the same keys as the flags")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="paper-deit, paper-gmm, paper-nf or quick")
    ] = None,
    list_presets: Annotated[bool, typer.Option(help="list the presets and exit")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="feature cache shared by all cells")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="rerun cells that failed before (default: skip them)")
    ] = False,
    timing: Annotated[
        bool | None, typer.Option("--timing/--no-timing", help="measure inference latency")
    ] = None,
    device: Annotated[str | None, typer.Option(help="device for the latency (cpu)")] = None,
    keep_models: Annotated[
        bool | None, typer.Option("--keep-models/--no-keep-models", help="keep every bundle")
    ] = None,
    executor: Annotated[
        str, typer.Option(help="local (cells one after the other here) or ray (a Ray cluster)")
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address, HOST:PORT or auto (--executor ray)")
    ] = None,
    cpus_per_task: Annotated[
        float | None, typer.Option(help="CPUs per Ray task, one task per category x backbone")
    ] = None,
    gpus_per_task: Annotated[float | None, typer.Option(help="GPUs per Ray task (0)")] = None,
    max_retries: Annotated[
        int | None, typer.Option(help="resubmissions of a Ray task whose worker was lost (2)")
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="curves/galleries folder (default beside the database); with Ray, a "
            "folder every node shares: workers write there instead of sending the files"
        ),
    ] = None,
) -> None:
    """Run a grid of datasets x backbones x heads; one database row per cell, resumable."""
    from vitqc.bench.executors import make_executor
    from vitqc.bench.grid import (
        PRESETS,
        load_config_file,
        merged_config,
        run_grid,
        spec_from_config,
    )
    from vitqc.bench.store import DEFAULT_DB

    if list_presets:
        for name, preset_cfg in PRESETS.items():
            typer.echo(f"{name}: {preset_cfg['description']}")
        return
    file_cfg: dict[str, Any] = load_config_file(config) if config else {}
    flags = {
        "data": [str(p) for p in data] if data else None,
        "backbones": backbones,
        "heads": heads,
        "categories": categories,
        "epochs": epochs,
        "patience": patience,
        "max_minutes": max_minutes,
        "weights": weights,
        "backbone_weights": _parse_backbone_weights(backbone_weights),
        "seed": seed,
        "image_size": image_size,
        "folds": folds,
        "image_score": image_score,
        "format": fmt,
        "bit_depth": bit_depth,
        "preset": preset,
        "timing": timing,
        "device": device,
        "keep_models": keep_models,
    }
    merged = merged_config(file_config=file_cfg, flags=flags)
    spec = spec_from_config(merged)
    db_path = Path(db or file_cfg.get("db") or DEFAULT_DB)
    cache = cache_dir or (Path(file_cfg["cache_dir"]) if file_cfg.get("cache_dir") else None)
    retry = retry_failed or bool(file_cfg.get("retry_failed"))
    runner = make_executor(
        executor,
        address=address,
        cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task,
        max_retries=max_retries,
    )
    summary = run_grid(
        spec,
        db_path,
        retry_failed=retry,
        cache_dir=cache,
        echo=typer.echo,
        executor=runner,
        artifacts_dir=artifacts,
    )
    typer.echo(summary.line())
    for label, error in summary.errors:
        typer.echo(f"failed: {label}: {error}")
    typer.echo(f"results in {db_path}")
    if summary.failed:
        raise typer.Exit(1)


def tables(
    db: DbArg,
    fmt: Annotated[str, typer.Option("--format", help="md, csv or latex")] = "md",
    table: Annotated[
        str | None, typer.Option(help="only one table: 1, 3 (Tables 3/4) or 5 (Tables 5/6)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None,
) -> None:
    """The evaluation paper's Tables 1, 3/4 and 5/6 from the stored runs."""
    from vitqc.atomic import write_text
    from vitqc.bench.store import open_store
    from vitqc.bench.tables import build_tables, render_tables

    with open_store(db, create=False) as store:
        runs = store.runs("ok")
    if not runs:
        raise VitqcError(f"no finished runs in {db}")
    text = render_tables(build_tables(runs, table), fmt)
    if out is not None:
        write_text(out, text)
        typer.echo(f"tables written to {out}")
    else:
        typer.echo(text, nl=False)


def recommend(
    db: DbArg,
    priority: Annotated[
        str,
        typer.Option(
            help="recall (missed defects are costly: AUROC), precision (false alarms: "
            "PR-AUC) or localization (AUPRO)"
        ),
    ] = "recall",
    max_latency_ms: Annotated[
        float | None, typer.Option(help="ms per image at batch 1, full pipeline")
    ] = None,
    max_params: Annotated[str | None, typer.Option(help="total parameters, e.g. 30M")] = None,
    device: Annotated[
        str | None, typer.Option(help="only latencies measured on this device (cpu, cuda)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Pareto front of accuracy vs latency vs size, and the model to deploy, with reasons."""
    from vitqc.bench.recommend import format_recommendation, parse_count
    from vitqc.bench.recommend import recommend as run_recommend
    from vitqc.bench.store import open_store

    with open_store(db, create=False) as store:
        runs = store.runs("ok")
    rec = run_recommend(
        runs,
        priority=priority,
        max_latency_ms=max_latency_ms,
        max_params=parse_count(max_params),
        device=device,
    )
    if as_json:
        typer.echo(json.dumps(rec.to_dict(), indent=2, default=str))
    else:
        typer.echo(format_recommendation(rec), nl=False)
    if rec.chosen is None:
        raise typer.Exit(1)


def report(
    db: DbArg,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write")] = Path("report.html"),
    title: Annotated[str | None, typer.Option(help="page title")] = None,
) -> None:
    """One self-contained HTML file: tables, trade-off plot, curves, anomaly-map galleries."""
    from vitqc.report.html import write_report

    path = write_report(db, out, title=title)
    typer.echo(f"report written to {path}")


def register(app: typer.Typer) -> None:
    """Add the benchmark commands to the ``vitqc`` app."""
    app.command()(benchmark)
    app.command()(tables)
    app.command()(recommend)
    app.command()(report)
