"""The benchmark grid: datasets/categories x backbones (with layers) x heads.

Each cell is fit (features + head, early stopping and calibration on validation), test
scoring, evaluation, curves and gallery, timing, bundle size, then one row written to
the results store in one transaction. Cells are ordered so that all heads of one
(category, backbone) run back to back against the same content-keyed feature cache:
the backbone runs once per image and the other heads read its features from disk.
Such a group is the unit an executor runs (``executors.py``: in this process, or one Ray
task per group on a cluster); whichever runs it, this process alone writes the database.

Resuming: a cell's identity is the hash of its configuration (``Cell.key``). A rerun of
the same grid skips cells whose row is ``ok``; cells whose row is ``error`` are skipped
too unless ``retry_failed`` is set (a deterministic failure, e.g. a missing weights
file, would otherwise fail again on every rerun). A failing cell is recorded with its
error and the grid goes on; Ctrl-C stops the grid between two database writes, so the
database only ever holds whole cells.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from vitqc.bench.store import now_iso, open_store, to_json
from vitqc.errors import VitqcError
from vitqc.heads import parse_head

if TYPE_CHECKING:
    from vitqc.bench.executors import Executor

# --------------------------------------------------------------------------- presets

_DEIT = "deit_base_distilled_patch16_224"
_SWIN = "swin_tiny_patch4_window7_224"  # EsViT: pass its checkpoint with backbone_weights
_EFF = "efficientformer_l3"
_RESNET = "resnet50"

#: The evaluation paper's configurations as data. Hyperparameters not set here come from
#: Table 2 (``heads.PAPER_DEFAULTS``: batch size, learning rate, weight decay, number of
#: Gaussians, flow steps, hidden ratio); images are 224 px (the backbones' input size)
#: and the train folder is split 80/20 into train/validation (``load_dataset``).
PRESETS: dict[str, dict[str, Any]] = {
    "paper-deit": {
        "description": (
            "Tables 3 (BTAD) and 4 (MVTec AD): DeiT-B with GMM and NF on the last block "
            "(i11), and NF on block 7 (i7), every category"
        ),
        "backbones": [
            {"name": _DEIT, "layers": [11], "heads": ["gmm", "flow"]},
            {"name": _DEIT, "layers": [7], "heads": ["flow"]},
        ],
        "heads": ["gmm", "flow"],
        "epochs": 500,
        "patience": 30,
        "head_options": {"gmm": {"conditioning": "embedding"}},
    },
    "paper-gmm": {
        "description": (
            "Table 5: GMM on DeiT-B, EsViT (Swin-T), EfficientFormer-L3 and ResNet-50 "
            "(last two stages, 50 Gaussians) for cable, carpet, grid, hazelnut, tile"
        ),
        "backbones": [
            {"name": _DEIT, "layers": [11]},
            {"name": _SWIN, "layers": [3]},
            {"name": _EFF, "layers": [3]},
            {"name": _RESNET, "layers": [3, 4]},
        ],
        "heads": ["gmm"],
        "categories": ["cable", "carpet", "grid", "hazelnut", "tile"],
        "epochs": 500,
        "patience": 30,
        "head_options": {"gmm": {"conditioning": "embedding"}},
    },
    "paper-nf": {
        "description": (
            "Table 6: NF (i11) on DeiT-B, EsViT (Swin-T), EfficientFormer-L3 and ResNet-50 "
            "(last three stages, 8 flow steps) for bottle, carpet, hazelnut, leather, screw"
        ),
        "backbones": [
            {"name": _DEIT, "layers": [11]},
            {"name": _SWIN, "layers": [3]},
            {"name": _EFF, "layers": [3]},
            {"name": _RESNET, "layers": [2, 3, 4]},
        ],
        "heads": ["flow"],
        "categories": ["bottle", "carpet", "hazelnut", "leather", "screw"],
        "epochs": 500,
        "patience": 30,
    },
    "quick": {
        "description": (
            "offline smoke benchmark: EfficientNet-Lite0 (packaged weights) with flow, gmm "
            "and knn, 20 epochs"
        ),
        "backbones": [{"name": "tf_efficientnet_lite0"}],
        "heads": ["flow", "gmm", "knn"],
        "epochs": 20,
        "patience": 5,
    },
}


# --------------------------------------------------------------------------- grid spec


@dataclass(frozen=True)
class BackboneChoice:
    """A backbone with its layers, weights source, input size and the heads it gets."""

    name: str
    layers: tuple[int, ...] | None = None
    weights: str | None = None
    heads: tuple[str, ...] | None = None
    image_size: int | None = None  # None: the grid's image_size, else the backbone's own

    @classmethod
    def parse(cls, item: str | Mapping[str, Any]) -> BackboneChoice:
        """``"name"``, ``"name:7"``, ``"name:2+3"``, ``"name:7@448"`` or a mapping with
        keys name, layers, weights, heads, image_size."""
        if isinstance(item, Mapping):
            unknown = set(item) - {"name", "layers", "weights", "heads", "image_size"}
            if unknown or "name" not in item:
                raise VitqcError(
                    f"backbone entry {dict(item)!r}: expected keys name, layers, weights, "
                    "heads, image_size"
                )
            layers = item.get("layers")
            if isinstance(layers, str | int):
                layers = _parse_layers(str(layers), str(item["name"]))
            heads = item.get("heads")
            if isinstance(heads, str):
                heads = _split(heads)
            return cls(
                str(item["name"]),
                tuple(int(v) for v in layers) if layers is not None else None,
                str(item["weights"]) if item.get("weights") is not None else None,
                tuple(str(h) for h in heads) if heads else None,
                _parse_size(item.get("image_size"), str(item["name"])),
            )
        text = str(item).strip()
        if not text:
            raise VitqcError("empty backbone name in --backbones")
        text, _, size = text.partition("@")
        name, _, layers = text.partition(":")
        return cls(
            name.strip(),
            _parse_layers(layers, name) if layers else None,
            image_size=_parse_size(size, name) if size else None,
        )

    def label(self) -> str:
        from vitqc.bench.tables import layers_label

        label = self.name + (f" {layers_label(self.layers)}" if self.layers else "")
        return label + (f" @{self.image_size}" if self.image_size else "")


def _split(text: str | Iterable[str] | None) -> list[str]:
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return [t.strip() for t in items if str(t).strip()]


def _parse_size(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        size = int(str(value).strip())
    except ValueError:
        size = 0
    if size < 1:
        raise VitqcError(
            f"image size of backbone {name!r} must be a positive integer, e.g. {name}@448, "
            f"got {value!r}"
        )
    return size


def _parse_layers(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v.strip().lstrip("i")) for v in text.replace("+", " ").split())
    except ValueError:
        raise VitqcError(
            f"layers of backbone {name!r} must be integers joined by '+', e.g. {name}:2+3, "
            f"got {text!r}"
        ) from None


@dataclass
class GridSpec:
    """Everything ``vitqc benchmark`` can set (flags, YAML file or preset)."""

    data: list[Path]
    backbones: list[BackboneChoice]
    heads: list[str]
    categories: list[str] | None = None
    format: str = "auto"
    #: bits per pixel of the datasets' grayscale images (``vitqc fit --bit-depth``)
    bit_depth: int = 8
    epochs: int = 500
    patience: int | None = None  # None: fit's default for its epoch selection
    max_minutes: float | None = None  # training time budget per cell
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    weights: str = "default"
    image_size: int | None = None  # None: each backbone's own input size
    #: folds of the out-of-fold threshold (None: fit's default; 0: validation images only)
    folds: int | None = None
    head_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    smoothing_sigma: float = 4.0
    image_score: str = "max"
    target_fpr: float | None = None
    timing: bool = True
    timing_repeats: int = 3
    timing_min_seconds: float = 0.2
    device: str = "cpu"
    gallery_good: int = 2
    gallery_defective: int = 3
    keep_models: bool = False
    preset: str | None = None


_SPEC_KEYS = {
    "data",
    "backbones",
    "heads",
    "categories",
    "format",
    "bit_depth",
    "epochs",
    "patience",
    "max_minutes",
    "seed",
    "val_fraction",
    "batch_size",
    "lr",
    "weight_decay",
    "weights",
    "image_size",
    "folds",
    "backbone_weights",
    "head_options",
    "smoothing_sigma",
    "image_score",
    "target_fpr",
    "timing",
    "timing_repeats",
    "timing_min_seconds",
    "device",
    "gallery_good",
    "gallery_defective",
    "keep_models",
    "preset",
}
#: Keys a YAML file may hold that are not part of the grid itself (the CLI reads them).
RUN_KEYS = {"db", "retry_failed", "cache_dir", "progress", "description"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) file with the same keys as the flags."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise VitqcError(f"benchmark config not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise VitqcError(f"benchmark config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VitqcError(f"benchmark config {path} must be a mapping of keys to values")
    unknown = set(data) - _SPEC_KEYS - RUN_KEYS
    if unknown:
        raise VitqcError(
            f"benchmark config {path}: unknown keys {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(_SPEC_KEYS | RUN_KEYS))})"
        )
    # Paths in a config file are relative to the file, not to the shell.
    if "data" in data:
        items = data["data"] if isinstance(data["data"], list) else [data["data"]]
        data["data"] = [str(path.parent / Path(str(p)).expanduser()) for p in items]
    for key in ("db", "cache_dir"):
        if data.get(key):
            data[key] = str(path.parent / Path(str(data[key])).expanduser())
    return data


def merged_config(
    preset: str | None = None,
    file_config: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Preset < config file < command-line flags (flags that are None are not given)."""
    out: dict[str, Any] = {}
    name = (flags or {}).get("preset") or (file_config or {}).get("preset") or preset
    if name:
        if name not in PRESETS:
            raise VitqcError(f"unknown --preset {name!r}: choose {', '.join(PRESETS)}")
        out.update(json.loads(json.dumps(PRESETS[name])))
        out["preset"] = name
    for layer in (file_config or {}, flags or {}):
        for key, value in layer.items():
            if value is not None:
                out[key] = value
    return out


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return bool(value)


def spec_from_config(config: Mapping[str, Any]) -> GridSpec:
    """Validate a merged config into a ``GridSpec`` (one-line errors naming the key)."""
    cfg = {k: v for k, v in config.items() if k not in RUN_KEYS}
    unknown = set(cfg) - _SPEC_KEYS
    if unknown:
        raise VitqcError(f"unknown benchmark settings: {', '.join(sorted(unknown))}")
    data = cfg.get("data") or []
    data = [data] if isinstance(data, str | Path) else list(data)
    if not data:
        raise VitqcError("no data: pass --data DIR (repeatable) or `data:` in the config file")
    raw_backbones = cfg.get("backbones") or []
    if isinstance(raw_backbones, str):
        raw_backbones = _split(raw_backbones)
    backbones = [BackboneChoice.parse(b) for b in raw_backbones]
    if not backbones:
        raise VitqcError("no backbones: pass --backbones a,b or a --preset")
    per_backbone = dict(cfg.get("backbone_weights") or {})
    backbones = [
        replace(b, weights=b.weights or per_backbone.get(b.name)) if per_backbone else b
        for b in backbones
    ]
    heads = _split(cfg.get("heads"))
    if not heads:
        raise VitqcError("no heads: pass --heads flow,gmm,knn or a --preset")
    for h in heads + [h for b in backbones for h in (b.heads or ())]:
        parse_head(h)
    categories = _split(cfg.get("categories")) or None
    spec = GridSpec(
        data=[Path(str(p)).expanduser() for p in data],
        backbones=backbones,
        heads=heads,
        categories=categories,
    )
    scalars = {
        "format": str,
        "bit_depth": int,
        "epochs": int,
        "patience": int,
        "max_minutes": float,
        "seed": int,
        "val_fraction": float,
        "batch_size": int,
        "lr": float,
        "weight_decay": float,
        "weights": str,
        "image_size": int,
        "folds": int,
        "smoothing_sigma": float,
        "image_score": str,
        "target_fpr": float,
        "timing": _as_bool,
        "timing_repeats": int,
        "timing_min_seconds": float,
        "device": str,
        "gallery_good": int,
        "gallery_defective": int,
        "keep_models": _as_bool,
        "preset": str,
    }
    for key, kind in scalars.items():
        if cfg.get(key) is not None:
            try:
                setattr(spec, key, kind(cfg[key]))
            except (TypeError, ValueError):
                expected = "true/false" if kind is _as_bool else kind.__name__
                raise VitqcError(f"benchmark setting {key}: expected {expected}") from None
    if cfg.get("head_options") is not None:
        if not isinstance(cfg["head_options"], Mapping):
            raise VitqcError("head_options must map a head name to its options")
        spec.head_options = {str(k): dict(v or {}) for k, v in cfg["head_options"].items()}
    from vitqc.data.io import white_level_for
    from vitqc.scoring import parse_image_score

    parse_image_score(spec.image_score)
    white_level_for(spec.bit_depth)
    if spec.epochs < 1:
        raise VitqcError(f"--epochs must be at least 1, got {spec.epochs}")
    if spec.max_minutes is not None and spec.max_minutes <= 0:
        raise VitqcError(f"--max-minutes must be positive, got {spec.max_minutes}")
    return spec


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One fit + evaluation: a category of a data root, a backbone choice, a head."""

    data: Path
    category: str | None
    backbone: BackboneChoice
    head: str  # a head name or a variant label such as "gmm:conditioning=embedding"

    @property
    def head_name(self) -> str:
        return parse_head(self.head)[0]

    @property
    def head_variant(self) -> dict[str, Any]:
        return parse_head(self.head)[1]

    def config(self, spec: GridSpec) -> dict[str, Any]:
        """Everything that changes the result: the key and the stored ``config_json``."""
        return {
            "data": str(self.data),
            "category": self.category,
            "format": spec.format,
            **({"bit_depth": spec.bit_depth} if spec.bit_depth != 8 else {}),
            "backbone": self.backbone.name,
            "layers": list(self.backbone.layers) if self.backbone.layers else None,
            "weights": self.backbone.weights or spec.weights,
            **({"image_size": size} if (size := self.image_size(spec)) else {}),
            "head": self.head_name,
            "head_options": {**spec.head_options.get(self.head_name, {}), **self.head_variant},
            "epochs": spec.epochs,
            "patience": spec.patience,
            "batch_size": spec.batch_size,
            "lr": spec.lr,
            "weight_decay": spec.weight_decay,
            "seed": spec.seed,
            "val_fraction": spec.val_fraction,
            "smoothing_sigma": spec.smoothing_sigma,
            **({"image_score": spec.image_score} if spec.image_score != "max" else {}),
            **({"max_minutes": spec.max_minutes} if spec.max_minutes is not None else {}),
            **({"folds": spec.folds} if spec.folds is not None else {}),
            "target_fpr": spec.target_fpr,
        }

    def image_size(self, spec: GridSpec) -> int | None:
        return self.backbone.image_size or spec.image_size

    def key(self, spec: GridSpec) -> str:
        blob = json.dumps(self.config(spec), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def label(self) -> str:
        cat = self.category or self.data.name
        return f"{cat} | {self.backbone.label()} | {self.head}"


def _categories_of(root: Path, spec: GridSpec) -> list[str | None]:
    from vitqc.data.layouts import list_categories

    found = list_categories(root, spec.format)
    if not found:  # the root itself is the one dataset
        if spec.categories and root.name not in spec.categories:
            return []
        return [None]
    if spec.categories is None:
        return list(found)
    return [c for c in spec.categories if c in found]


def expand_grid(spec: GridSpec) -> list[Cell]:
    """The cells in run order: data root, category, backbone, then its heads."""
    cells: list[Cell] = []
    seen_categories: set[str] = set()
    for root in spec.data:
        if not root.is_dir():
            raise VitqcError(f"--data {root} is not a folder")
        root = root.resolve()
        for category in _categories_of(root, spec):
            seen_categories.add(category or root.name)
            for bb in spec.backbones:
                for head in spec.heads:
                    if bb.heads is not None and head not in bb.heads:
                        continue
                    cells.append(Cell(root, category, bb, head))
    if spec.categories:
        missing = [c for c in spec.categories if c not in seen_categories]
        if missing and not cells:
            raise VitqcError(
                f"categories {', '.join(missing)} not found in {', '.join(map(str, spec.data))}"
            )
    if not cells:
        raise VitqcError("the benchmark grid is empty: check --data, --categories and --heads")
    return cells


# --------------------------------------------------------------------------- running


@dataclass
class GridSummary:
    total: int = 0
    ran: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_failed: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"{self.total} cells: {self.ok} ran ok", f"{self.failed} failed"]
        parts.append(f"{self.skipped} already done")
        if self.skipped_failed:
            parts.append(f"{self.skipped_failed} earlier failures skipped (--retry-failed)")
        return ", ".join(parts) + f" ({self.seconds:.1f} s)"


def _head_size(head: Any) -> int:
    """Parameters plus buffers: knn's memory bank is a buffer, and it is the head's size."""
    params = sum(p.numel() for p in head.parameters())
    buffers = sum(b.numel() for b in head.buffers())
    return int(params + buffers)


def _identity(cell: Cell, dataset_name: str, category: str) -> dict[str, Any]:
    return {
        "dataset": dataset_name,
        "category": category,
        "backbone": cell.backbone.name,
        "head": cell.head,
    }


def run_cell(
    cell: Cell,
    spec: GridSpec,
    dataset: Any,
    artifacts_root: Path,
    cache_dir: Path | None,
    key: str,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Fit, evaluate, draw, time and size one cell; return its row and per-defect rows."""
    from vitqc.backbones.cache import FeatureCache
    from vitqc.bench.artifacts import select_gallery, write_run_artifacts
    from vitqc.bench.tables import model_label
    from vitqc.bench.timing import backbone_parameters, dir_size, measure_latency
    from vitqc.bundle import save_bundle
    from vitqc.pipeline import FitOptions, fit, score_samples
    from vitqc.report.evaluation import evaluate_predictions

    if not dataset.test:
        raise VitqcError(f"no test images in {dataset.name}/{dataset.category}")
    config = cell.config(spec)
    options = FitOptions(
        backbone=cell.backbone.name,
        layers=cell.backbone.layers,
        weights=config["weights"],
        image_size=cell.image_size(spec),
        head=cell.head_name,
        head_options=dict(config["head_options"]),
        epochs=spec.epochs,
        patience=spec.patience,
        max_minutes=spec.max_minutes,
        batch_size=spec.batch_size,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        seed=spec.seed,
        smoothing_sigma=spec.smoothing_sigma,
        image_score=spec.image_score,
        target_fpr=spec.target_fpr,
        bit_depth=spec.bit_depth,
        **({"folds": spec.folds} if spec.folds is not None else {}),
        cache_dir=cache_dir,
        progress=progress,
    )
    model, report = fit(dataset, options)
    start = time.perf_counter()
    cache = FeatureCache(cache_dir)
    scores, maps = score_samples(model, dataset.test, cache=cache, progress=progress)
    result = evaluate_predictions(
        dataset.test, scores, list(maps) if dataset.has_masks else None, float(model.threshold)
    )
    eval_seconds = time.perf_counter() - start

    rel = f"runs/{key}"
    gallery = select_gallery(dataset.test, spec.gallery_good, spec.gallery_defective)
    write_run_artifacts(
        artifacts_root,
        rel,
        dataset=dataset.name,
        category=dataset.category,
        samples=dataset.test,
        scores=scores,
        maps=maps,
        model=model,
        gallery=gallery,
    )

    notes: list[str] = []
    latency: dict[str, float] = {}
    if spec.timing:
        # Timing is a bonus: a failure (e.g. a module that does not run on the device)
        # is noted in the row's error column and the cell's accuracy is kept.
        timing_errors: list[str] = []
        try:
            latency = measure_latency(
                model,
                (1, 32),
                device=spec.device,
                min_seconds=spec.timing_min_seconds,
                min_repeats=spec.timing_repeats,
                errors=timing_errors,
            )
        except Exception as exc:
            timing_errors.append(f"{type(exc).__name__}: {exc}")
        notes += [f"timing failed: {e}" for e in timing_errors]

    meta = {"dataset": {"root": str(cell.data), "category": dataset.category}, "fit": {}}
    meta["fit"] = report.to_dict()
    if spec.keep_models:
        bundle_dir = artifacts_root / "models" / key
        save_bundle(model, bundle_dir, meta)
        bundle_bytes = dir_size(bundle_dir)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=artifacts_root))
        try:
            bundle_bytes = dir_size(save_bundle(model, tmp / "model", meta))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    shapes = model.extractor.feature_shapes()
    row: dict[str, Any] = {
        **_identity(cell, dataset.name, dataset.category),
        "layers": list(model.extractor.layers),
        "weights": config["weights"],
        "config_json": {**config, "fit": report.to_dict(), "preset": spec.preset},
        "metrics_json": result,
        "error": "; ".join(notes) or None,
        "feature_seconds": report.feature_seconds,
        "head_seconds": report.head_seconds,
        "eval_seconds": eval_seconds,
        "backbone_params": backbone_parameters(model.extractor),
        "head_params": _head_size(model.head),
        "bundle_bytes": bundle_bytes,
        "feature_channels": [int(s[0]) for s in shapes],
        "feature_sizes": [[int(s[1]), int(s[2])] for s in shapes],
        "input_size": list(model.input_size),
        "n_train": report.n_train,
        "n_val": report.n_val,
        "n_test": len(dataset.test),
        "artifacts": rel,
    }
    for col in ("image_auroc", "pixel_auroc", "aupro", "image_prauc", "f1", "precision"):
        row[col] = result.get(col)
    row["recall"] = result.get("recall")
    row["threshold"] = result.get("threshold")
    for name, value in latency.items():
        row[name] = value
    row["method"] = model_label(row)
    return row, dict(result.get("per_defect_type") or {})


def _machine_columns(spec: GridSpec) -> dict[str, Any]:
    from vitqc.bench.timing import machine_facts

    facts = machine_facts(spec.device)
    return {
        "cpu_model": facts["cpu_model"],
        "threads": facts["threads"],
        "torch_version": facts["torch_version"],
        "device": facts["device"],
        "machine_json": facts,
        "vitqc_version": facts["vitqc_version"],
    }


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, VitqcError):
        return str(exc)
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


@dataclass
class CellResult:
    """A finished cell as the driver stores it: its row, its per-defect rows and, from a
    worker that does not share the artifacts folder, its artifact files (path under the
    artifacts folder -> bytes)."""

    cell: Cell
    key: str
    row: dict[str, Any]
    per_defect: dict[str, dict[str, Any]]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.row.get("status") == "ok"


#: Cells of one (data root, category, backbone with its layers and weights), in run order.
CellGroup = list[tuple[Cell, str]]


def feature_key(cell: Cell, spec: GridSpec) -> tuple[Any, ...]:
    """What the backbone's features depend on: cells with the same key share them."""
    weights = cell.backbone.weights or spec.weights
    return (
        cell.data,
        cell.category,
        cell.backbone.name,
        cell.backbone.layers,
        weights,
        cell.image_size(spec),
    )


def group_cells(pending: Iterable[tuple[Cell, str]], spec: GridSpec) -> list[CellGroup]:
    """Pending cells grouped by :func:`feature_key`, groups in order of first appearance."""
    groups: dict[tuple[Any, ...], CellGroup] = {}
    for cell, key in pending:
        groups.setdefault(feature_key(cell, spec), []).append((cell, key))
    return list(groups.values())


def error_row(
    cell: Cell,
    key: str,
    spec: GridSpec,
    message: str,
    *,
    dataset: Any = None,
    machine: Mapping[str, Any] | None = None,
    created_at: str | None = None,
) -> dict[str, Any]:
    """The row of a failed cell (``machine``: the columns of the host that ran it)."""
    from vitqc.bench.tables import model_label

    loaded = dataset is not None and not isinstance(dataset, BaseException)
    name = dataset.name if loaded else cell.data.name
    category = dataset.category if loaded else cell.category or cell.data.name
    row = {
        "cell_key": key,
        "config_json": to_json(cell.config(spec)),
        "created_at": created_at or now_iso(),
        **(machine or {}),
        **_identity(cell, str(name), str(category)),
        "layers": list(cell.backbone.layers) if cell.backbone.layers else None,
        "weights": cell.backbone.weights or spec.weights,
        "status": "error",
        "error": message,
    }
    row["method"] = model_label(row)
    return row


CellRunner = Callable[..., tuple[dict[str, Any], dict[str, dict[str, Any]]]]


def run_group(
    spec: GridSpec,
    cells: CellGroup,
    artifacts_root: Path,
    cache_dir: Path | None,
    *,
    progress: bool = True,
    cell_runner: CellRunner = run_cell,
    datasets: dict[tuple[Path, str | None], Any] | None = None,
    on_start: Callable[[Cell], None] | None = None,
) -> Iterator[CellResult]:
    """Run one group's cells in order and yield each cell's result as it finishes.

    The cell code of every executor (in process or on a Ray worker): the first cell that
    succeeds extracts the features, the others read them from the cache; a failing cell
    becomes an error row and the group goes on. ``datasets`` carries loaded datasets
    from one group to the next (one category in memory at a time).
    """
    from vitqc.data.layouts import load_dataset

    machine = _machine_columns(spec)
    datasets = {} if datasets is None else datasets
    extracted = False
    for cell, key in cells:
        if on_start is not None:
            on_start(cell)
        ds_key = (cell.data, cell.category)
        if ds_key not in datasets:
            datasets.clear()
            try:
                datasets[ds_key] = load_dataset(
                    cell.data,
                    format=spec.format,
                    category=cell.category,
                    val_fraction=spec.val_fraction,
                    seed=spec.seed,
                )
            except Exception as exc:
                datasets[ds_key] = exc
        dataset = datasets[ds_key]
        created_at = now_iso()
        try:
            if isinstance(dataset, Exception):
                raise dataset
            row, per_defect = cell_runner(
                cell, spec, dataset, artifacts_root, cache_dir, key, progress=progress
            )
            row = {
                "cell_key": key,
                "config_json": to_json(cell.config(spec)),
                "created_at": created_at,
                **machine,
                **row,
                "status": "ok",
                "features_reused": int(extracted),
            }
            extracted = True
        except Exception as exc:
            row = error_row(
                cell,
                key,
                spec,
                _error_text(exc),
                dataset=dataset,
                machine=machine,
                created_at=created_at,
            )
            per_defect = {}
        yield CellResult(cell, key, row, per_defect)


def run_grid(
    spec: GridSpec,
    db_path: str | Path,
    *,
    retry_failed: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    cell_runner: CellRunner = run_cell,
    executor: Executor | None = None,
    artifacts_dir: str | Path | None = None,
) -> GridSummary:
    """Run every unfinished cell of the grid; one transaction per finished cell.

    ``cache_dir``: the feature cache shared by all cells (default: the user cache,
    ``$VITQC_CACHE``). ``cell_runner`` is the per-cell work (replaceable in tests).
    ``executor`` runs the groups of cells (``executors.LocalExecutor``, the default, or
    ``executors.RayExecutor``); whichever it is, this process alone writes the database,
    one cell at a time as results arrive. ``artifacts_dir``: where curves and galleries
    go (default: beside the database; fixed by a database's first run).
    """
    from vitqc.bench.executors import LocalExecutor, write_artifact_files

    start = time.perf_counter()
    cells = expand_grid(spec)
    executor = executor or LocalExecutor()
    if spec.timing and spec.device.startswith("cuda") and isinstance(executor, LocalExecutor):
        import torch

        if not torch.cuda.is_available():
            raise VitqcError(f"--device {spec.device}: no CUDA device is available here")
    summary = GridSummary(total=len(cells))
    cache = Path(cache_dir).expanduser() if cache_dir else None
    with open_store(db_path) as store:
        if artifacts_dir is not None:
            store.use_artifacts_dir(artifacts_dir)
        artifacts_root = store.artifacts_dir
        artifacts_root.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[Cell, str]] = []
        for cell in cells:
            key = cell.key(spec)
            status = store.status_of(key)
            if status == "ok":
                summary.skipped += 1
            elif status == "error" and not retry_failed:
                summary.skipped_failed += 1
            else:
                pending.append((cell, key))
        if echo and (summary.skipped or summary.skipped_failed):
            echo(
                f"resuming: {summary.skipped} cells done, {summary.skipped_failed} failed "
                f"earlier{'' if retry_failed else ' (skipped; --retry-failed reruns them)'}, "
                f"{len(pending)} to run"
            )

        def say(text: str) -> None:  # above the progress bar, or through echo
            if progress:
                tqdm.write(text)
            elif echo:
                echo(text)

        bar = tqdm(
            total=len(cells),
            initial=len(cells) - len(pending),
            unit="cell",
            desc="benchmark",
            disable=not progress,
            dynamic_ncols=True,
        )
        results = executor.run(
            spec,
            group_cells(pending, spec),
            artifacts_root=artifacts_root,
            shared_artifacts=artifacts_dir is not None,
            cache_dir=cache,
            progress=progress,
            cell_runner=cell_runner,
            on_start=lambda cell: bar.set_postfix_str(cell.label(), refresh=True),
            echo=say if echo else None,
        )
        try:
            with contextlib.closing(results):
                for result in results:
                    if result.files:  # before the row, so that a row never points to nothing
                        write_artifact_files(artifacts_root, result.files)
                    if result.ok:
                        summary.ok += 1
                    else:
                        summary.failed += 1
                        summary.errors.append((result.cell.label(), result.row["error"]))
                        if echo:
                            say(f"cell failed: {result.cell.label()}: {result.row['error']}")
                    store.record(result.row, result.per_defect)
                    summary.ran += 1
                    bar.update(1)
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - start
    return summary
