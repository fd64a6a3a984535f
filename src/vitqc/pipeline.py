"""The fit / evaluate / predict workflows, shared by the CLI, the demo and the benchmark.

Order matters for honesty: the preprocessing statistics and the feature
standardization come from the train split, early stopping and calibration from the
validation split, and the test split is only ever scored to report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vitqc.backbones import create_backbone
from vitqc.backbones.cache import FeatureCache
from vitqc.calibration import Calibration, fit_calibration, resolve_target
from vitqc.data.io import expand_inputs, load_image
from vitqc.data.proxy import ProxySet, make_proxy_set, proxy_figures
from vitqc.data.records import Dataset, Sample
from vitqc.data.transforms import Preprocessor, iter_resized_batches, resize_batch
from vitqc.errors import VitqcError
from vitqc.folds import DEFAULT_FOLDS, OutOfFold, out_of_fold_scores
from vitqc.heads import (
    HEADS,
    check_backbone,
    create_head,
    default_backbone,
    head_defaults,
    position_free_options,
    preview_head,
)
from vitqc.heads.base import FeatureStandardizer, Head
from vitqc.scoring import AnomalyModel, aggregate_maps
from vitqc.training import (
    TrainConfig,
    TrainResult,
    fixed_inputs,
    has_fixed_inputs,
    train_head,
    training_precision,
)


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
    #: None: when epochs are chosen by the proxy the head overrides' ``proxy_patience``
    #: (registry) or ``PROXY_PATIENCE``, else ``LOSS_PATIENCE``
    patience: int | None = None
    max_minutes: float | None = None
    batch_size: int | None = None
    #: Batches per epoch (``TrainConfig.steps_per_epoch``); None: one pass. Not shortened
    #: by default: rated every 4 or 8 steps, the EfficientNet-Lite0 flow stopped sooner on
    #: magnetic_tile, at a lower test image AUROC on each of three seeds (issue 14 notes).
    steps_per_epoch: int | None = None
    #: Bits per pixel of the user's images (``--bit-depth``): a camera's 10 to 16 for
    #: grayscale files of more than 8 bits, read with ``2 ** bit_depth - 1`` as white.
    bit_depth: int = 8
    #: ``TrainConfig.precision``: "auto" (bfloat16 where the head allows it and the CPU
    #: computes it natively), "float32" or "bfloat16"
    train_precision: str = "auto"
    lr: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    smoothing_sigma: float = 4.0
    image_score: str = "max"
    minmax: bool = True
    #: The decision rule: "fpr" (a target false-reject rate on the good validation
    #: images) or "f1-synthetic" (the F1-best threshold on the good validation images
    #: against their synthetic-defect copies; labelled as synthetic wherever shown).
    calibration: str = "fpr"
    #: None: 1 %, lowered to what the good images support (with a warning); an explicit
    #: target the data cannot support is an error.
    target_fpr: float | None = None
    #: The threshold rests on out-of-fold scores of every good image (train + validation)
    #: from this many folds; 0 or 1: on the validation images only.
    folds: int = DEFAULT_FOLDS
    #: Labelled defective images kept for choosing the threshold (rule "f1"); never
    #: test images.
    val_defects: Sequence[Sample] = ()
    #: The per-region rule: flag only when a region above the threshold covers at least
    #: this many original pixels (0: off; ``vitqc.decision``).
    min_area: float = 0.0
    cache_dir: Path | None = None
    progress: bool = True
    #: How a trainable head's epoch is chosen: "proxy" (localization on synthetic
    #: defects pasted onto the good validation images) or "loss" (validation NLL).
    select: str = "proxy"
    #: Per-position or position-free feature statistics: "auto" rates both on the
    #: synthetic-defect validation set and keeps the better; "position" / "free" force one.
    statistics: str = "auto"
    #: Try ``fit_candidates``' search space and keep the best by the proxy.
    auto: bool = False


SELECTIONS = ("proxy", "loss")
CALIBRATIONS = ("fpr", "f1", "f1-synthetic")
STATISTICS = ("auto", "position", "free")
#: Epochs without a better rating before training stops (a backbone's head overrides
#: may set their own, ``proxy_patience``). Heads that start from the whitened Gaussian
#: peak within a few epochs by the proxy; NLL keeps falling for hundreds of epochs,
#: hence the longer patience there.
PROXY_PATIENCE = 2
LOSS_PATIENCE = 30


@dataclass
class FitReport:
    feature_seconds: float
    head_seconds: float
    n_train: int
    n_val: int
    train: TrainResult | None
    calibration: Calibration
    train_config: dict[str, Any]
    #: the fitted model's figures on the synthetic-defect validation set (None: too few
    #: validation images to build one)
    proxy: dict[str, float] | None = None
    selection: str = "loss"
    #: every rated choice with its proxy figures (empty when there was nothing to choose)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: str = ""
    #: how the normal scores behind the threshold were made (None: validation only)
    out_of_fold: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "feature_seconds": self.feature_seconds,
            "head_seconds": self.head_seconds,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "train_config": self.train_config,
            "calibration": self.calibration.to_dict(),
            "proxy": self.proxy,
            "selection": self.selection,
            "candidates": self.candidates,
            "chosen": self.chosen,
            "out_of_fold": self.out_of_fold,
        }
        if self.train is not None:
            # the loss curve travels too (at most ``epochs`` pairs): it shows convergence
            out["train"] = asdict(self.train)
        return out


def build_preprocessor(
    extractor, train: Sequence[Sample], minmax: bool, bit_depth: int = 8
) -> Preprocessor:
    pre = Preprocessor(
        extractor.input_size, extractor.mean, extractor.std, minmax=minmax, bit_depth=bit_depth
    )
    if minmax:
        pre.fit_minmax(iter_resized_batches(train, extractor.input_size, 32, pre.white_level))
    return pre


@dataclass
class ProxyRating:
    """A model's figures on the synthetic-defect validation set, with the image scores
    and maps ``[N]``, ``[N, H, W]`` they came from: the good validation images' (what the
    threshold is calibrated on) and their defective copies'."""

    figures: dict[str, float]
    good: tuple[np.ndarray, np.ndarray]
    defect: tuple[np.ndarray, np.ndarray]


@dataclass
class ProxyValidation:
    """The synthetic-defect validation set with the backbone features of both halves."""

    defects: ProxySet
    good_features: list[torch.Tensor]
    defect_features: list[torch.Tensor]

    def figures(self, model: AnomalyModel) -> dict[str, float]:
        return self.rating(model).figures

    def rating(
        self,
        model: AnomalyModel,
        inputs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> ProxyRating:
        """The model's figures under its own image score, with its scores and maps.
        ``inputs``: the head's ``fixed_inputs`` of the good and the defective features."""
        good_in, defect_in = inputs or (self.good_features, self.defect_features)
        from_inputs = inputs is not None
        good = score_features(model, good_in, from_inputs=from_inputs)
        defect = score_features(model, defect_in, from_inputs=from_inputs)
        return ProxyRating(proxy_figures(*good, *defect, self.defects.masks), good, defect)

    def rater(self, model: AnomalyModel) -> Callable[[], ProxyRating]:
        """``rating(model)`` for a model rated again and again as its head trains: the
        part training leaves unchanged (``Head.fixed_inputs``, the fitted standardization)
        runs on the good and defective features once, not at every rating."""
        if not has_fixed_inputs(model.head):
            return lambda: self.rating(model)
        inputs = (
            fixed_inputs(model.head, self.good_features),
            fixed_inputs(model.head, self.defect_features),
        )
        return lambda: self.rating(model, inputs)

    def figures_by_image_score(
        self, model: AnomalyModel, image_scores: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """The figures of one model under several image scores: its maps (the costly
        part) are computed once (``rating``), each other image score aggregates them as
        the model would."""
        rated = self.rating(model)
        (_, good_maps), (_, defect_maps) = rated.good, rated.defect
        own_score = type(model.head).score is not Head.score  # VT-ADL: map-independent
        out = {}
        for name in image_scores:
            if name == model.image_score or own_score:
                out[name] = rated.figures
                continue
            good = aggregate_maps(torch.from_numpy(good_maps), name).numpy()
            defect = aggregate_maps(torch.from_numpy(defect_maps), name).numpy()
            out[name] = proxy_figures(good, good_maps, defect, defect_maps, self.defects.masks)
        return out


@dataclass
class _Features:
    """What one layer set of one backbone gives: extractor, preprocessor, features."""

    extractor: Any
    preprocessor: Preprocessor
    train: list[torch.Tensor]
    val: list[torch.Tensor]
    proxy: ProxyValidation | None


@dataclass(frozen=True)
class Candidate:
    """One model ``fit`` may choose: a head with options, a layer set, an image score."""

    head: str
    head_options: tuple[tuple[str, Any], ...] = ()
    layers: tuple[int, ...] | None = None
    image_score: str = "max"

    @property
    def label(self) -> str:
        opts = "+".join(f"{k}={json.dumps(v)}" for k, v in self.head_options)
        layers = ",".join(map(str, self.layers)) if self.layers else "default"
        return f"{self.head}{':' + opts if opts else ''} layers={layers} score={self.image_score}"


#: ``vitqc fit --auto``: training-free heads (rated as they will be used) with the layer
#: sets to try, per-position and position-free statistics (``statistics="auto"``), two
#: image scores. The stride-4 stage (layer 1 of EfficientNet-Lite) goes to the gaussian
#: head only: it quadruples the knn head's patches (its coreset and search time) and
#: scored lower with knn on kolektorsdd (1 % coreset, pixel AUROC 0.811 vs 0.822).
AUTO_HEADS = ("gaussian", "knn")
AUTO_LAYER_SETS: dict[tuple[str, str], tuple[tuple[int, ...] | None, ...]] = {
    ("gaussian", "tf_efficientnet_lite0"): ((2, 3), (1, 2, 3)),
    ("gaussian", "tf_efficientnet_lite1"): ((2, 3), (1, 2, 3)),
}
AUTO_IMAGE_SCORES = ("max", "top:0.01")


def fit_candidates(options: FitOptions, backbone: str) -> list[Candidate]:
    """The user's model, or with ``options.auto`` the small search space above."""
    if not options.auto:
        return [
            Candidate(
                options.head,
                tuple(sorted(options.head_options.items())),
                options.layers,
                options.image_score,
            )
        ]
    return [
        Candidate(head, (), layers, score)
        for head in AUTO_HEADS
        for layers in AUTO_LAYER_SETS.get((head, backbone), (options.layers,))
        for score in AUTO_IMAGE_SCORES
    ]


class _ModelSearch:
    """What one ``fit`` shares between the models it considers: the backbone per layer
    set, one preprocessor, cached features and the synthetic-defect validation set."""

    def __init__(self, dataset: Dataset, options: FitOptions) -> None:
        self.dataset, self.options = dataset, options
        self.backbone = options.backbone or default_backbone(options.head)
        self.image_size = options.image_size
        if self.image_size is None and self.backbone == "pixels" and dataset.native_size:
            self.image_size = dataset.native_size  # e.g. 28 px digits stay 28 px
        self.cache = FeatureCache(options.cache_dir)
        self.feature_seconds = 0.0
        self._extractors: dict[tuple[int, ...] | None, Any] = {}
        self._features: dict[tuple[int, ...] | None, _Features] = {}
        self._preprocessor: Preprocessor | None = None
        self._defects: ProxySet | None = None

    def extractor(self, layers: tuple[int, ...] | None) -> Any:
        if layers not in self._extractors:
            self._extractors[layers] = create_backbone(
                self.backbone,
                layers=layers,
                weights=self.options.weights,
                image_size=self.image_size,
            )
        return self._extractors[layers]

    def features(self, layers: tuple[int, ...] | None) -> _Features:
        if layers in self._features:
            return self._features[layers]
        start = time.perf_counter()
        data, options, extractor = self.dataset, self.options, self.extractor(layers)
        if self._preprocessor is None:  # same backbone, input size and statistics
            self._preprocessor = build_preprocessor(
                extractor, data.train, options.minmax, options.bit_depth
            )
        pre = self._preprocessor

        def extract(samples: Sequence[Sample]) -> list[torch.Tensor]:
            return self.cache.extract(extractor, pre, samples, progress=options.progress)

        train, val = extract(data.train), extract(data.val)
        proxy = None
        if len(data.val) >= 2:
            if self._defects is None:  # the same images for every layer set
                self._defects = make_proxy_set(
                    data.val, extractor.input_size, options.seed, pre.white_level
                )
            proxy = ProxyValidation(self._defects, val, extract(self._defects.samples))
        self._features[layers] = _Features(extractor, pre, train, val, proxy)
        self.feature_seconds += time.perf_counter() - start
        return self._features[layers]

    def head_defaults(self, cand: Candidate) -> dict[str, Any]:
        ext = self.extractor(cand.layers)
        return head_defaults(cand.head, ext.name, ext.family)

    def choices(self) -> list[tuple[Candidate, dict[str, Any]]]:
        """Every (candidate, head option overrides) to consider; a head that cannot run
        on the backbone is refused here, before any feature is extracted."""
        candidates = fit_candidates(self.options, self.backbone)
        for cand in candidates:
            ext = self.extractor(cand.layers)
            check_backbone(cand.head, ext.name, ext.family)
        statistics, out = self.options.statistics, []
        for cand in candidates:
            merged = {**self.head_defaults(cand)["head"], **dict(cand.head_options)}
            free = position_free_options(cand.head, merged)
            if statistics in ("auto", "position") or free is None:
                out.append((cand, {}))
            if statistics in ("auto", "free") and free is not None:
                out.append((cand, free))
        return out

    def build(
        self,
        cand: Candidate,
        overrides: dict[str, Any],
        preview: bool,
        train_features: list[torch.Tensor] | None = None,
        fitted: FeatureStandardizer | None = None,
    ) -> AnomalyModel:
        """The candidate's head, prepared on the training features or ``train_features``
        (``preview``: the cheaper stand-in ``heads.preview_head`` used only to rate it;
        ``fitted``: statistics already fitted on the same features, e.g. the preview's)."""
        feats = self.features(cand.layers)
        train = feats.train if train_features is None else train_features
        name = cand.head
        kwargs = {**self.head_defaults(cand)["head"], **dict(cand.head_options), **overrides}
        if preview:
            name, kwargs = preview_head(name, kwargs)
        kwargs.setdefault("seed", self.options.seed)  # a seed among the head options wins
        sizes = [tuple(f.shape[-2:]) for f in train]
        torch.manual_seed(self.options.seed)  # before the head: initial weights, prepare()
        head = create_head(name, [f.shape[1] for f in train], sizes, **kwargs)
        head.prepare(train, fitted)
        return AnomalyModel(
            feats.preprocessor,
            feats.extractor,
            head,
            smoothing_sigma=self.options.smoothing_sigma,
            image_score=cand.image_score,
        )

    def choose(
        self, choices: list[tuple[Candidate, dict[str, Any]]]
    ) -> tuple[AnomalyModel, Candidate, dict[str, Any], list[dict[str, Any]]]:
        """Rate every choice on the proxy (when there is a choice and a proxy set) and
        return the best one's model, ready to train, with every rating."""
        rated: list[dict[str, Any]] = []
        best, previews = 0, {}
        if len(choices) > 1 and all(self.features(c.layers).proxy for c, _ in choices):
            groups: dict[tuple, list[int]] = {}  # choices that differ in image score only
            for i, (cand, overrides) in enumerate(choices):
                groups.setdefault(_choice_key(cand, overrides), []).append(i)
            figures: dict[int, dict[str, float]] = {}
            bar = tqdm(
                groups.items(),
                desc="rate on synthetic defects",
                unit="model",
                disable=not self.options.progress,
                leave=False,
            )
            for key, members in bar:
                cand, overrides = choices[members[0]]
                bar.set_postfix_str(_choice_label(cand, overrides), refresh=False)
                previews[key] = self.build(cand, overrides, preview=True)
                scores = [choices[i][0].image_score for i in members]
                by_score = self.features(cand.layers).proxy.figures_by_image_score(
                    previews[key], scores
                )
                figures.update({i: by_score[choices[i][0].image_score] for i in members})
            for i, (cand, overrides) in enumerate(choices):
                rated.append({"candidate": _choice_label(cand, overrides), **figures[i]})
                if figures[i]["proxy"] > rated[best]["proxy"]:
                    best = i
        cand, overrides = choices[best]
        key = _choice_key(cand, overrides)
        merged = {**self.head_defaults(cand)["head"], **dict(cand.head_options), **overrides}
        if key in previews and preview_head(cand.head, merged) == (cand.head, merged):
            model = previews[key]  # rated as it will be used: no second preparation
            model.image_score = cand.image_score
        else:  # the rated preview's statistics are the chosen head's when of its kind
            fitted = getattr(previews[key].head, "standardize", None) if key in previews else None
            model = self.build(cand, overrides, preview=False, fitted=fitted)
        return model, cand, overrides, rated


def calibrate(
    model: AnomalyModel,
    feats: _Features,
    options: FitOptions,
    normal_scores: np.ndarray | None = None,
    cache: FeatureCache | None = None,
    rated: ProxyRating | None = None,
) -> Calibration:
    """The decision threshold, its FPR and the map normalization, before any test image:
    the threshold from ``normal_scores`` (out-of-fold scores of the good images; None:
    the validation images), the normalization from the validation maps. ``rated``: the
    model's rating on the synthetic-defect validation set, whose scores and maps of the
    validation images (and their defective copies) are used instead of scoring again."""
    val_scores, val_maps = rated.good if rated else score_features(model, feats.val)
    if options.calibration in ("f1", "f1-synthetic"):
        if options.calibration == "f1":  # the user's labelled defective images
            defect_scores, defect_maps = score_samples(
                model, options.val_defects, cache, progress=options.progress
            )
        elif rated is not None:
            defect_scores, defect_maps = rated.defect
        else:
            defect_scores, defect_maps = score_features(model, feats.proxy.defect_features)
        labels = np.r_[np.zeros(len(val_scores)), np.ones(len(defect_scores))]
        calibration = fit_calibration(
            np.r_[val_scores, defect_scores],
            list(val_maps) + list(defect_maps),
            method="f1",
            labels=labels,
            normal_scores=normal_scores,
        )
        return replace(calibration, method=options.calibration)
    return fit_calibration(
        val_scores,
        val_maps,
        method="fpr",
        target_fpr=options.target_fpr,
        normal_scores=normal_scores,
    )


def fold_scores(
    search: _ModelSearch,
    cand: Candidate,
    overrides: dict[str, Any],
    train_cfg: TrainConfig | None,
) -> OutOfFold:
    """Out-of-fold scores of every good image (train, then validation) for the chosen
    model: each fold's model is built like the final one on the other folds' features
    and, for a trainable head, trained for ``train_cfg.epochs`` (no selection)."""
    feats = search.features(cand.layers)
    good = [torch.cat([t, v]) for t, v in zip(feats.train, feats.val, strict=True)]

    def fit_model(features: list[torch.Tensor]) -> AnomalyModel:
        model = search.build(cand, overrides, preview=False, train_features=features)
        if model.head.trainable and train_cfg is not None and train_cfg.epochs > 0:
            train_head(model.head, features, None, train_cfg)
        model.head.eval()
        return model

    return out_of_fold_scores(
        good,
        fit_model,
        lambda model, held: score_features(model, held)[0],
        folds=search.options.folds,
        seed=search.options.seed,
        progress=search.options.progress,
    )


def _choice_key(cand: Candidate, overrides: dict[str, Any]) -> tuple:
    return (cand.head, cand.head_options, cand.layers, json.dumps(overrides, sort_keys=True))


def _choice_label(cand: Candidate, overrides: dict[str, Any]) -> str:
    return cand.label + (f" {json.dumps(overrides)}" if overrides else "")


def fit(dataset: Dataset, options: FitOptions) -> tuple[AnomalyModel, FitReport]:
    """Fit the model ``options`` describe; where there is a choice (position-free or
    per-position statistics, ``--auto``'s candidates) rate each choice on the
    synthetic-defect validation set and keep the best."""
    if not dataset.train:
        raise VitqcError(f"empty training set in {dataset.name}/{dataset.category}")
    if options.select not in SELECTIONS:
        raise VitqcError(f"--select must be one of {', '.join(SELECTIONS)}, got {options.select!r}")
    if options.calibration not in CALIBRATIONS:
        raise VitqcError(
            f"--threshold-rule must be one of {', '.join(CALIBRATIONS)}, "
            f"got {options.calibration!r}"
        )
    if options.calibration == "f1-synthetic" and len(dataset.val) < 2:
        raise VitqcError(
            "--threshold-rule f1-synthetic needs at least 2 good validation images to paste "
            f"synthetic defects onto, got {len(dataset.val)}"
        )
    if options.calibration == "f1" and not options.val_defects:
        raise VitqcError(
            "--threshold-rule f1 needs labelled defective images (--val-defects FOLDER); "
            "without them use f1-synthetic or fpr"
        )
    test_files = {s.path.resolve() for s in dataset.test if s.path is not None}
    overlap = [s.path for s in options.val_defects if s.path and s.path.resolve() in test_files]
    if overlap:
        raise VitqcError(
            f"--val-defects holds test images (e.g. {overlap[0]}): the test split is only "
            "ever scored; keep separate defective images for the threshold"
        )
    if options.min_area < 0:
        raise VitqcError(f"--min-area must be 0 or more, got {options.min_area}")
    if options.steps_per_epoch is not None and options.steps_per_epoch < 1:
        raise VitqcError(f"--steps-per-epoch must be 1 or more, got {options.steps_per_epoch}")
    if options.head in HEADS:  # an unknown head is refused with its own message
        try:
            training_precision(HEADS[options.head], options.train_precision)
        except ValueError as exc:
            raise VitqcError(f"--train-precision {options.train_precision}: {exc}") from exc
    if options.folds < 0:
        raise VitqcError(f"--threshold-folds must be 0 or more, got {options.folds}")
    if options.target_fpr is not None and options.calibration == "fpr":
        n_good = len(dataset.train) + len(dataset.val)
        oof = options.folds >= 2 and n_good >= 2  # refuse an unsupported target up front
        resolve_target(
            options.target_fpr,
            n_good if oof else len(dataset.val),
            "out-of-fold" if oof else "validation",
        )
    if options.statistics not in STATISTICS:
        raise VitqcError(
            f"--statistics must be one of {', '.join(STATISTICS)}, got {options.statistics!r}"
        )
    start = time.perf_counter()
    search = _ModelSearch(dataset, options)
    model, cand, overrides, rated = search.choose(search.choices())
    feats, head = search.features(cand.layers), model.head
    defaults = search.head_defaults(cand)
    proxy = feats.proxy
    selection = "proxy" if options.select == "proxy" and proxy is not None else "loss"
    patience = options.patience
    if patience is None:  # a backbone's head overrides may set the proxy's (registry)
        proxy_patience = defaults.get("proxy_patience", PROXY_PATIENCE)
        patience = proxy_patience if selection == "proxy" else LOSS_PATIENCE
    train_cfg = TrainConfig(
        epochs=options.epochs,
        patience=patience,
        batch_size=options.batch_size or defaults.get("batch_size", 32),
        steps_per_epoch=options.steps_per_epoch,
        precision=options.train_precision,
        lr=options.lr or defaults.get("lr", 1e-3),
        weight_decay=options.weight_decay
        if options.weight_decay is not None
        else defaults.get("weight_decay", 0.0),
        seed=options.seed,
        progress=options.progress,
        max_minutes=options.max_minutes,
    )
    result, rated_epochs = None, []  # proxy figures of epoch 0, 1, ... when rated
    # the epoch and rating train_head will keep (the first highest); checked against its
    # result before the rating's scores and maps stand in for the calibration's
    best: list[tuple[int, ProxyRating]] = []

    def select() -> float:
        rating = rate()
        rated_epochs.append(rating.figures)
        if not best or rating.figures["proxy"] > best[0][1].figures["proxy"]:
            best[:] = [(len(rated_epochs) - 1, rating)]
        return rating.figures["proxy"]

    if head.trainable:
        use = None
        if selection == "proxy":
            rate, use = proxy.rater(model), select
        result = train_head(head, feats.train, feats.val, train_cfg, select=use)
    head.eval()
    kept = None  # the kept model's rating: its scores and maps calibrate it too
    if rated_epochs:  # the best epoch's weights are back: its figures are the model's
        proxy_result = rated_epochs[result.best_epoch]
        kept = best[0][1] if best[0][0] == result.best_epoch else None
    else:
        kept = proxy.rating(model) if proxy is not None else None
        proxy_result = kept.figures if kept is not None else None
    oof = None
    if options.folds >= 2 and len(dataset.train) + len(dataset.val) >= 2:
        fold_cfg = None
        if result is not None:  # the final model's epoch count, as a fixed budget
            fold_cfg = replace(
                train_cfg, epochs=result.best_epoch, progress=False, max_minutes=None
            )
        oof = fold_scores(search, cand, overrides, fold_cfg)
    normal = None if oof is None else oof.scores
    calibration = calibrate(model, feats, options, normal, search.cache, kept)
    calibration = replace(calibration, min_area=float(options.min_area))
    model.set_calibration(calibration)
    report = FitReport(
        search.feature_seconds,
        time.perf_counter() - start - search.feature_seconds,
        len(dataset.train),
        len(dataset.val),
        result,
        calibration,
        asdict(train_cfg),
        proxy_result,
        selection if head.trainable else "none (training-free head)",
        candidates=rated,
        chosen=_choice_label(cand, overrides),
        out_of_fold=None if oof is None else oof.summary(),
    )
    return model, report


def score_features(
    model: AnomalyModel,
    features: list[torch.Tensor],
    batch_size: int = 32,
    from_inputs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores ``[N]`` and maps ``[N, H, W]`` (input size) from cached features
    (``from_inputs``: the head's ``fixed_inputs`` of them)."""
    scores, maps = [], []
    n = features[0].shape[0]
    for start in range(0, n, batch_size):
        batch = [f[start : start + batch_size] for f in features]
        m, s = model.maps_from_features(batch, from_inputs=from_inputs)
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
    batches = iter_resized_batches(samples, model.input_size, 16, model.preprocessor.white_level)
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
    white = model.preprocessor.white_level
    for x01 in iter_resized_batches(samples, model.input_size, batch_size, white):
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
        image = load_image(sample, model.preprocessor.white_level)
        norm, thr = _display_maps(model, resize_to(raw, image.shape[:2]))
        mask = load_mask(sample, image.shape[:2])
        name = sample.key.replace("/", "__").rsplit(".", 1)[0] + ".png"
        title = f"{sample.key}  score {raw.max():.4g}  threshold {float(model.threshold):.4g}"
        save_evaluation_panel(out_dir / name, image, mask, norm, thr, title)


def defect_samples(folder: Path) -> list[Sample]:
    """Every image under ``folder`` as a labelled defective sample (``--val-defects``)."""
    return [
        Sample(key=f"val_defects/{p.relative_to(folder)}", label=1, defect_type="val", path=p)
        for p in expand_inputs([Path(folder)])
    ]


def predict_images(
    model: AnomalyModel, inputs: Sequence[Path], out_dir: Path, min_area: float | None = None
) -> list[dict]:
    """Score images of any size; write a heat-map overlay per image; return summary rows.
    The decision is ``vitqc.decision.decide`` with the stored minimum area, or
    ``min_area`` (original pixels) when given."""
    from vitqc.data.io import read_image
    from vitqc.decision import decide, operator_score
    from vitqc.report.figures import anomaly_overlay, resize_to, save_png

    if not np.isfinite(float(model.threshold)):
        raise VitqcError("this model has no calibrated threshold: refit it with `vitqc fit`")
    files = expand_inputs(inputs)
    out_dir = Path(out_dir)
    threshold = float(model.threshold)
    min_area = float(model.min_area) if min_area is None else float(min_area)
    rows, used = [], set()
    for path in tqdm(files, desc="predict", unit="img", leave=False):
        image = read_image(path, model.preprocessor.white_level)
        maps, scores = model(resize_batch([image], model.input_size))
        raw = resize_to(maps[0].numpy(), image.shape[:2])
        norm, thr = _display_maps(model, raw)
        name = path.stem
        while name in used:
            name += "_"
        used.add(name)
        overlay = out_dir / "overlays" / f"{name}.png"
        save_png(anomaly_overlay(image, norm, thr), overlay)
        score = float(scores[0])
        flagged, areas = decide(
            scores.numpy(), maps.numpy(), threshold, min_area, [image.shape[:2]]
        )
        row = {
            "file": str(path),
            "score": score,
            # the operator scale (0.5 at the threshold), as in the export and the runtime
            "normalized_score": float(operator_score(score, float(model.map_low), threshold)),
            "threshold": threshold,
            "defective": bool(flagged[0]),
            "overlay": str(overlay),
        }
        if areas is not None:
            row.update(min_area_px=min_area, largest_region_px=float(areas[0]))
        rows.append(row)
    return rows
