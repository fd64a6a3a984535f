"""The fit / evaluate / predict workflows, shared by the CLI, the demo and the benchmark.

Order matters for honesty: the preprocessing statistics and the feature
standardization come from the train split, early stopping and calibration from the
validation split, and the test split is only ever scored to report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitqc.backbones import create_backbone
from vitqc.backbones.cache import FeatureCache
from vitqc.calibration import Calibration, fit_calibration
from vitqc.data.io import load_image
from vitqc.data.records import Dataset, Sample
from vitqc.data.transforms import Preprocessor, resize_batch
from vitqc.errors import VitqcError
from vitqc.heads import check_backbone, create_head, default_backbone, head_defaults
from vitqc.scoring import AnomalyModel
from vitqc.training import TrainConfig, TrainResult, train_head


@dataclass
class FitOptions:
    """Everything ``vitqc fit`` can set; None means "the paper's default for this pair"."""

    backbone: str | None = None  # None: the head's default (heads.default_backbone)
    layers: tuple[int, ...] | None = None
    weights: str = "default"
    image_size: int | None = None
    head: str = "flow"
    head_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 500
    patience: int = 30
    max_minutes: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    smoothing_sigma: float = 4.0
    image_score: str = "max"
    minmax: bool = True
    calibration: str = "fpr"
    target_fpr: float | None = None
    cache_dir: Path | None = None
    progress: bool = True


@dataclass
class FitReport:
    feature_seconds: float
    head_seconds: float
    n_train: int
    n_val: int
    train: TrainResult | None
    calibration: Calibration
    train_config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "feature_seconds": self.feature_seconds,
            "head_seconds": self.head_seconds,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "train_config": self.train_config,
            "calibration": self.calibration.to_dict(),
        }
        if self.train is not None:
            # the loss curve travels too (at most ``epochs`` pairs): it shows convergence
            out["train"] = asdict(self.train)
        return out


def iter_image_batches(
    samples: Sequence[Sample], size: tuple[int, int], batch_size: int
) -> Iterator[torch.Tensor]:
    """Load and resize images batch by batch (values in [0, 1])."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        yield resize_batch([load_image(s) for s in chunk], size)


def build_preprocessor(extractor, train: Sequence[Sample], minmax: bool) -> Preprocessor:
    pre = Preprocessor(extractor.input_size, extractor.mean, extractor.std, minmax=minmax)
    if minmax:
        pre.fit_minmax(iter_image_batches(train, extractor.input_size, 32))
    return pre


def fit(dataset: Dataset, options: FitOptions) -> tuple[AnomalyModel, FitReport]:
    if not dataset.train:
        raise VitqcError(f"empty training set in {dataset.name}/{dataset.category}")
    backbone = options.backbone or default_backbone(options.head)
    image_size = options.image_size
    if image_size is None and backbone == "pixels" and dataset.native_size is not None:
        image_size = dataset.native_size  # e.g. 28 px digits stay 28 px
    extractor = create_backbone(
        backbone, layers=options.layers, weights=options.weights, image_size=image_size
    )
    check_backbone(options.head, extractor.name, extractor.family)
    defaults = head_defaults(options.head, extractor.name, extractor.family)
    train_cfg = TrainConfig(
        epochs=options.epochs,
        patience=options.patience,
        batch_size=options.batch_size or defaults.get("batch_size", 32),
        lr=options.lr or defaults.get("lr", 1e-3),
        weight_decay=options.weight_decay
        if options.weight_decay is not None
        else defaults.get("weight_decay", 0.0),
        seed=options.seed,
        progress=options.progress,
        max_minutes=options.max_minutes,
    )
    head_kwargs = {**defaults["head"], **options.head_options, "seed": options.seed}

    start = time.perf_counter()
    pre = build_preprocessor(extractor, dataset.train, options.minmax)
    cache = FeatureCache(options.cache_dir) if options.cache_dir else FeatureCache()
    train_feats = cache.extract(extractor, pre, dataset.train, progress=options.progress)
    val_feats = cache.extract(extractor, pre, dataset.val, progress=options.progress)
    feature_seconds = time.perf_counter() - start

    start = time.perf_counter()
    sizes = [tuple(f.shape[-2:]) for f in train_feats]
    torch.manual_seed(options.seed)  # before the head: its initial weights, then prepare()
    head = create_head(options.head, [f.shape[1] for f in train_feats], sizes, **head_kwargs)
    head.prepare(train_feats)
    result = train_head(head, train_feats, val_feats, train_cfg) if head.trainable else None
    head.eval()
    model = AnomalyModel(
        pre,
        extractor,
        head,
        smoothing_sigma=options.smoothing_sigma,
        image_score=options.image_score,
    )
    val_scores, val_maps = score_features(model, val_feats)
    cal_kwargs = {} if options.target_fpr is None else {"target_fpr": options.target_fpr}
    calibration = fit_calibration(val_scores, val_maps, method=options.calibration, **cal_kwargs)
    model.set_calibration(calibration)
    head_seconds = time.perf_counter() - start
    report = FitReport(
        feature_seconds,
        head_seconds,
        len(dataset.train),
        len(dataset.val),
        result,
        calibration,
        asdict(train_cfg),
    )
    return model, report


def score_features(
    model: AnomalyModel, features: list[torch.Tensor], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores ``[N]`` and maps ``[N, H, W]`` (input size) from cached features."""
    scores, maps = [], []
    n = features[0].shape[0]
    for start in range(0, n, batch_size):
        m, s = model.maps_from_features([f[start : start + batch_size] for f in features])
        maps.append(m.numpy())
        scores.append(s.numpy())
    if not maps:
        return np.zeros(0), np.zeros((0, *model.input_size))
    return np.concatenate(scores), np.concatenate(maps)


def score_samples(
    model: AnomalyModel,
    samples: Sequence[Sample],
    cache: FeatureCache | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Score dataset samples, reusing cached backbone features when available."""
    if cache is not None:
        feats = cache.extract(model.extractor, model.preprocessor, list(samples), progress=progress)
        return score_features(model, feats)
    scores, maps = [], []
    batches = iter_image_batches(samples, model.input_size, 16)
    for x in tqdm(batches, total=-(-len(samples) // 16), desc="score", disable=not progress):
        m, s = model(x)
        maps.append(m.numpy())
        scores.append(s.numpy())
    return np.concatenate(scores), np.concatenate(maps)


@torch.no_grad()
def image_score_candidates(
    model: AnomalyModel, samples: Sequence[Sample], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Alternative image scores on ``samples``, each ``[N]``: the maximum and the mean of
    the (smoothed) map, plus the head's own ``score_candidates`` when it has them (VT-ADL's
    loss terms). For choosing an image score on data, not for inference."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for x01 in iter_image_batches(samples, model.input_size, batch_size):
        features = [f.clone() for f in model.features(x01)]  # out of inference mode
        maps, _ = model.maps_from_features(features)
        values = {"map_max": maps.flatten(1).amax(1), "map_mean": maps.flatten(1).mean(1)}
        if hasattr(model.head, "score_candidates"):
            values.update(model.head.score_candidates(features))
        for key, value in values.items():
            parts.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def _display_maps(model: AnomalyModel, maps: np.ndarray) -> tuple[np.ndarray, float]:
    norm = model.normalize(torch.tensor(np.asarray(maps, dtype=np.float32))).numpy()
    thr = float(model.normalize(model.threshold.clone()))
    return norm, thr


def write_evaluation_figures(
    model: AnomalyModel, samples: Sequence[Sample], maps: np.ndarray, out_dir: Path
) -> None:
    """One panel per test image: image, ground truth, anomaly map, thresholded map."""
    from vitqc.data.io import load_mask
    from vitqc.report.figures import resize_to, save_evaluation_panel

    out_dir = Path(out_dir)
    for sample, raw in tqdm(list(zip(samples, maps, strict=True)), desc="figures", leave=False):
        image = load_image(sample)
        norm, thr = _display_maps(model, resize_to(raw, image.shape[:2]))
        mask = load_mask(sample, image.shape[:2])
        name = sample.key.replace("/", "__").rsplit(".", 1)[0] + ".png"
        title = f"{sample.key}  score {raw.max():.4g}  threshold {float(model.threshold):.4g}"
        save_evaluation_panel(out_dir / name, image, mask, norm, thr, title)


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    from vitqc.data.io import is_image_file

    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image_file(p))
            if not found:
                raise VitqcError(f"no images found in folder {item}")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise VitqcError(f"input not found: {item}")
    return files


def predict_images(model: AnomalyModel, inputs: Sequence[Path], out_dir: Path) -> list[dict]:
    """Score images of any size; write a heat-map overlay per image; return summary rows."""
    from vitqc.data.io import read_image
    from vitqc.report.figures import heat_overlay, resize_to, save_png

    if not np.isfinite(float(model.threshold)):
        raise VitqcError("this model has no calibrated threshold: refit it with `vitqc fit`")
    files = expand_inputs(inputs)
    out_dir = Path(out_dir)
    rows, used = [], set()
    for path in tqdm(files, desc="predict", unit="img", leave=False):
        image = read_image(path)
        maps, scores = model(resize_batch([image], model.input_size))
        raw = resize_to(maps[0].numpy(), image.shape[:2])
        norm, _ = _display_maps(model, raw)
        name = path.stem
        while name in used:
            name += "_"
        used.add(name)
        overlay = out_dir / "overlays" / f"{name}.png"
        save_png(heat_overlay(image, norm), overlay)
        score = float(scores[0])
        rows.append(
            {
                "file": str(path),
                "score": score,
                "normalized_score": float(model.normalize(torch.tensor(score))),
                "threshold": float(model.threshold),
                "defective": bool(score > float(model.threshold)),
                "overlay": str(overlay),
            }
        )
    return rows
