"""The synthetic-defect validation set and selection of training epochs by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MAGNETIC_TILE, require

from vitqc.data import proxy as proxy_module
from vitqc.data.layouts import load_dataset
from vitqc.data.proxy import PROXY_KINDS, make_proxy_set, proxy_figures
from vitqc.data.synth import MIN_DELTA
from vitqc.data.transforms import resize_batch
from vitqc.heads import create_head, head_defaults, position_free_options
from vitqc.pipeline import LOSS_PATIENCE
from vitqc.training import TrainConfig, evaluate_loss, train_head


@pytest.fixture(scope="module")
def dataset(synth_root):
    return load_dataset(synth_root, category="tile", seed=0)


def _resized(samples, size):
    batch = resize_batch([proxy_module.load_image(s) for s in samples], size)
    return proxy_module._to_uint8(batch)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_masks_are_exactly_the_changed_pixels(dataset, size):
    good = dataset.train[:12]
    proxy = make_proxy_set(good, size, seed=3)
    originals = _resized(good, size)
    assert len(proxy.samples) == 12 and proxy.masks.shape == (12, *size)
    assert set(proxy.kinds) <= set(PROXY_KINDS) and len(set(proxy.kinds)) >= 5
    for sample, mask, original in zip(proxy.samples, proxy.masks, originals, strict=True):
        image = sample.array
        assert sample.label == 1 and image.shape == (*size, 3) and image.dtype == np.uint8
        assert mask.any()
        delta = np.abs(image.astype(np.int16) - original.astype(np.int16)).max(axis=2)
        assert (delta[~mask] == 0).all(), sample.key  # nothing outside the mask changed
        assert (delta[mask] >= MIN_DELTA).all(), sample.key  # every mask pixel did


def test_proxy_set_is_deterministic_and_depends_on_the_seed(dataset):
    a = make_proxy_set(dataset.val, (64, 64), seed=0)
    b = make_proxy_set(dataset.val, (64, 64), seed=0)
    c = make_proxy_set(dataset.val, (64, 64), seed=1)
    assert all(np.array_equal(x.array, y.array) for x, y in zip(a.samples, b.samples, strict=True))
    assert np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.masks, c.masks)


def test_fit_builds_the_proxy_from_validation_images_only(dataset, monkeypatch):
    """Every image the proxy reads is a good validation image: never a test image."""
    from vitqc.pipeline import FitOptions, fit

    read: list[str] = []
    real_load = proxy_module.load_image
    monkeypatch.setattr(
        proxy_module, "load_image", lambda s, *white: read.append(s.key) or real_load(s, *white)
    )
    model, report = fit(dataset, FitOptions(head="gaussian", progress=False))
    assert sorted(read) == sorted(s.key for s in dataset.val)
    assert not {s.key for s in dataset.test} & set(read)
    assert report.proxy is not None and 0.5 < report.proxy["proxy"] <= 1.0
    assert set(report.proxy) == {"image_auroc", "pixel_auroc", "aupro", "proxy"}


def test_proxy_figures_of_a_perfect_and_an_inverted_map():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[:, 2:4, 2:4] = True
    good_maps = np.zeros((3, 8, 8))
    perfect = masks.astype(float)
    figures = proxy_figures(np.zeros(3), good_maps, np.ones(3), perfect, masks)
    assert figures == pytest.approx(
        {"image_auroc": 1.0, "pixel_auroc": 1.0, "aupro": 1.0, "proxy": 1.0}
    )
    inverted = proxy_figures(np.ones(3), good_maps + 2, np.zeros(3), 1 - perfect, masks)
    assert inverted["proxy"] < 0.1


def _features(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, 4, 4, generator=g)]


def test_training_keeps_the_epoch_the_selection_rates_best():
    train, val = _features(32, 0), _features(8, 1)
    ratings = iter([0.5, 0.6, 0.9, 0.7, 0.8, 0.85, 0.1, 0.2])  # epoch 0 (start) .. 7
    snapshots = {}
    head = create_head("flow", [4], [(4, 4)], steps=2, standardize="channel")
    head.prepare(train)

    def select():
        snapshots[len(snapshots)] = {k: v.clone() for k, v in head.state_dict().items()}
        return next(ratings)

    cfg = TrainConfig(epochs=50, patience=4, batch_size=8, lr=1e-2, progress=False)
    result = train_head(head, train, val, cfg, select=select)
    assert result.best_epoch == 2 and result.best_rating == 0.9
    assert result.initial_rating == 0.5
    assert result.epochs_run == 6 and result.stopped == "patience"  # 4 epochs without a gain
    assert [h[2] for h in result.history] == [0.6, 0.9, 0.7, 0.8, 0.85, 0.1]
    assert all(np.isnan(h[1]) for h in result.history)  # no per-epoch validation loss
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, snapshots[2][key], msg=key)
    # the validation loss of the kept weights, computed once at the end
    assert evaluate_loss(head, val, 8) == pytest.approx(result.best_val_loss, rel=1e-5)


def test_training_can_keep_the_starting_point():
    train, val = _features(32, 0), _features(8, 1)
    head = create_head("flow", [4], [(4, 4)], steps=2, standardize="channel")
    head.prepare(train)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    ratings = iter([1.0, 0.2, 0.3])
    cfg = TrainConfig(epochs=50, patience=2, batch_size=8, lr=1e-2, progress=False)
    result = train_head(head, train, val, cfg, select=lambda: next(ratings))
    assert (result.best_epoch, result.epochs_run) == (0, 2)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, start[key], msg=key)


@pytest.mark.slow
def test_proxy_on_real_images_keeps_masks_exact():
    data = load_dataset(require(MAGNETIC_TILE), seed=0)
    proxy = make_proxy_set(data.val[:12], (224, 224), seed=0)
    originals = _resized(data.val[:12], (224, 224))
    for sample, mask, original in zip(proxy.samples, proxy.masks, originals, strict=True):
        delta = np.abs(sample.array.astype(np.int16) - original.astype(np.int16)).max(axis=2)
        assert mask.any() and (delta[~mask] == 0).all() and (delta[mask] >= MIN_DELTA).all()


def _fit(dataset, tmp_path, **kw):
    from vitqc.pipeline import FitOptions, fit

    kw.setdefault("folds", 0)  # the threshold's out-of-fold scores: test_thresholds.py
    return fit(dataset, FitOptions(progress=False, cache_dir=tmp_path / "cache", **kw))


def test_statistics_auto_rates_both_and_keeps_the_better(dataset, tmp_path):
    model, report = _fit(dataset, tmp_path, head="gaussian")
    assert len(report.candidates) == 2
    per_position, free = report.candidates
    assert "whiten" in free["candidate"] and "whiten" not in per_position["candidate"]
    best = max(report.candidates, key=lambda r: r["proxy"])
    assert report.chosen == best["candidate"]
    expected = "position-whiten" if best is per_position else "whiten"
    assert model.head.standardize.mode == expected
    # the kept model is the rated one: its proxy figures are the chosen candidate's
    assert report.proxy["proxy"] == pytest.approx(best["proxy"], rel=1e-6)


@pytest.mark.parametrize("statistics,mode", [("position", "position-whiten"), ("free", "whiten")])
def test_statistics_can_be_forced(dataset, tmp_path, statistics, mode):
    model, report = _fit(dataset, tmp_path, head="gaussian", statistics=statistics)
    assert report.candidates == [] and model.head.standardize.mode == mode


def test_knn_candidates_are_rated_on_a_small_coreset_and_refitted_in_full(dataset, tmp_path):
    model, report = _fit(dataset, tmp_path, head="knn", statistics="auto")
    labels = [r["candidate"] for r in report.candidates]
    assert len(labels) == 2 and any('"standardize": null' in label for label in labels)
    # the position-free candidate is the plain PatchCore embedding (3 x 3 neighbourhoods),
    # whatever the backbone's default neighbourhood
    free = position_free_options("knn", {"standardize": "position", "neighbourhood": 1})
    assert free == {"standardize": None, "fuse": False, "neighbourhood": 3}
    assert position_free_options("knn", {"standardize": None}) is None
    train_patches = len(dataset.train) * 28 * 28  # finest grid of lite0 layers 2,3 at 224 px
    assert model.head.bank.shape[0] == round(0.1 * train_patches)  # full coreset, not 1 %


def test_auto_tries_every_candidate_and_reports_their_figures(dataset, tmp_path):
    from vitqc.pipeline import AUTO_HEADS, AUTO_IMAGE_SCORES

    model, report = _fit(dataset, tmp_path, head="flow", auto=True)
    # gaussian on two layer sets, knn on one; each with both statistics and image scores
    n = (2 + 1) * len(AUTO_IMAGE_SCORES) * 2
    assert len(report.candidates) == n
    for row in report.candidates:
        assert set(row) == {"candidate", "image_auroc", "pixel_auroc", "aupro", "proxy"}
    best = max(report.candidates, key=lambda r: r["proxy"])
    assert report.chosen == best["candidate"]
    assert model.head.name in AUTO_HEADS and model.head.name in report.chosen
    assert f"score={model.image_score}" in report.chosen


def test_f1_threshold_on_synthetic_defects_is_labelled_as_such(dataset, tmp_path):
    from vitqc.metrics import f1_precision_recall
    from vitqc.pipeline import score_features

    model, report = _fit(dataset, tmp_path, head="gaussian", calibration="f1-synthetic")
    cal = report.calibration
    assert cal.method == "f1-synthetic" and cal.target_fpr is None
    assert (cal.n_val_good, cal.n_val_defective) == (len(dataset.val), len(dataset.val))
    # the stored threshold is the F1-best one on good validation images vs their copies
    search_proxy = make_proxy_set(dataset.val, model.input_size, seed=0)
    from vitqc.backbones.cache import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    good = cache.extract(model.extractor, model.preprocessor, dataset.val, progress=False)
    bad = cache.extract(model.extractor, model.preprocessor, search_proxy.samples, progress=False)
    scores = np.r_[score_features(model, good)[0], score_features(model, bad)[0]]
    labels = np.r_[np.zeros(len(dataset.val)), np.ones(len(dataset.val))]
    f1, _, _ = f1_precision_recall(labels, scores, cal.threshold)
    assert f1 == pytest.approx(cal.val_f1)
    for t in np.unique(scores):
        assert f1_precision_recall(labels, scores, t)[0] <= f1 + 1e-12


def test_f1_synthetic_needs_validation_images(dataset, tmp_path):
    from dataclasses import replace

    from vitqc.errors import VitqcError

    tiny = replace(dataset, val=dataset.val[:1])
    with pytest.raises(VitqcError, match="f1-synthetic needs at least 2 good validation"):
        _fit(tiny, tmp_path, head="gaussian", calibration="f1-synthetic")


def test_flow_and_gmm_statistics_are_rated_on_the_gaussian_they_start_from(dataset, tmp_path):
    # the GMM's EfficientNet-Lite default whitens the fused map (heads' registry data)
    _, gaussian = _fit(dataset, tmp_path, head="gaussian", head_options={"fuse": True})
    _, gmm = _fit(dataset, tmp_path, head="gmm", epochs=1, head_options={"n_components": 4})
    assert [r["proxy"] for r in gmm.candidates] == [r["proxy"] for r in gaussian.candidates]
    assert gmm.chosen.startswith("gmm")
    # the kept GMM's figures are those of its best-rated epoch, not recomputed
    assert gmm.proxy["proxy"] == gmm.train.best_rating


def test_the_chosen_head_takes_the_rated_gaussians_statistics(dataset, tmp_path, monkeypatch):
    """Each whitening the GMM was rated with is fitted once: the chosen one is reused,
    and it is exactly what fitting it again on the training features gives."""
    from vitqc.heads.base import FeatureStandardizer
    from vitqc.pipeline import FitOptions, _ModelSearch

    fitted_modes: list[str] = []
    real_fit = FeatureStandardizer.fit
    monkeypatch.setattr(
        FeatureStandardizer,
        "fit",
        lambda self, features: fitted_modes.append(self.mode) or real_fit(self, features),
    )
    model, report = _fit(dataset, tmp_path, head="gmm", epochs=0, head_options={"n_components": 4})
    assert len(report.candidates) == 2  # per-position and position-free, each rated
    assert sorted(fitted_modes) == ["position-whiten", "whiten"]  # and not fitted again
    search = _ModelSearch(dataset, FitOptions(progress=False, cache_dir=tmp_path / "cache"))
    train = search.features(None).train
    kept = model.head.standardize
    fresh = FeatureStandardizer(
        model.head.feature_channels, model.head.feature_sizes, kept.mode, fuse=kept.fuse
    )
    real_fit(fresh, train)
    assert fresh.same_statistics(kept)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, kept.state_dict()[name]), name
    other = FeatureStandardizer(model.head.feature_channels, model.head.feature_sizes, "position")
    assert not other.same_statistics(kept)


def test_image_scores_of_one_model_share_its_maps_and_match_one_by_one(dataset, tmp_path):
    from vitqc.pipeline import FitOptions, _ModelSearch

    search = _ModelSearch(dataset, FitOptions(progress=False, cache_dir=tmp_path / "cache"))
    (cand, overrides), *_ = search.choices()
    model = search.build(cand, overrides, preview=False)
    proxy = search.features(cand.layers).proxy
    names = ["max", "top:0.05", "mean"]
    together = proxy.figures_by_image_score(model, names)
    for name in names:
        model.image_score = name
        assert together[name] == pytest.approx(proxy.figures(model), rel=1e-6)
    assert together["max"]["image_auroc"] != together["mean"]["image_auroc"]


@pytest.mark.parametrize("head", ["flow", "gmm", "vtadl"])
def test_ratings_in_training_standardize_the_proxy_features_once(dataset, tmp_path, head):
    """A rater scores the head's fixed inputs, computed once: its figures are those of
    the model scored from its features, rating after rating (the head changing), and
    the standardization runs on the proxy features only when the rater is made."""
    from vitqc.pipeline import FitOptions, _ModelSearch

    options = {"gmm": {"n_components": 4}, "flow": {"steps": 2}}.get(head, {})
    fit_options = FitOptions(
        head=head, head_options=options, progress=False, cache_dir=tmp_path / "cache"
    )
    search = _ModelSearch(dataset, fit_options)
    (cand, overrides), *_ = search.choices()
    model = search.build(cand, overrides, preview=False)
    proxy = search.features(cand.layers).proxy
    calls = []
    if head != "vtadl":  # VT-ADL has no fixed part: its rater is figures itself
        model.head.standardize.register_forward_hook(lambda *_: calls.append(1))
    rate, ratings = proxy.rater(model), []
    for _ in range(2):
        before = len(calls)
        ratings.append(rate().figures)
        assert len(calls) == before  # nothing standardized again
        assert ratings[-1] == pytest.approx(proxy.figures(model), rel=1e-5)
        model.head.train()  # an epoch's worth of change
        with torch.no_grad():
            for p in model.head.parameters():
                p.add_(0.05 * torch.randn_like(p))
    assert ratings[0]["proxy"] != ratings[1]["proxy"]
    assert head == "vtadl" or len(calls) > 0  # figures() standardizes every time


@pytest.mark.parametrize(
    "kw,patience",
    [({}, 1), ({"patience": 3}, 3), ({"select": "loss", "epochs": 2}, LOSS_PATIENCE)],
)
def test_whitened_lite_flow_stops_one_epoch_after_its_best_rating(dataset, tmp_path, kw, patience):
    """EfficientNet-Lite's flow and GMM (started from the whitened Gaussian) take the
    registry's proxy patience of 1; an explicit patience, or selection by loss, wins."""
    _, report = _fit(dataset, tmp_path, head="flow", head_options={"steps": 2}, **kw)
    assert report.train_config["patience"] == patience
    if patience == 1:
        assert report.train.stopped == "patience"
        assert report.train.epochs_run == report.train.best_epoch + 1
    assert head_defaults("gmm", "tf_efficientnet_lite0", "cnn")["proxy_patience"] == 1
    assert "proxy_patience" not in head_defaults("flow", "resnet50", "cnn")


@pytest.mark.parametrize("head,rule", [("flow", "fpr"), ("gaussian", "f1-synthetic")])
def test_the_kept_models_rating_calibrates_it_as_scoring_again_would(dataset, tmp_path, head, rule):
    """fit calibrates on the scores and maps of the kept model's proxy rating (the
    validation images and their defective copies) instead of scoring them again: the
    threshold and the map range are those of a fresh calibration."""
    from vitqc.pipeline import FitOptions, _ModelSearch, calibrate

    options = {"flow": {"steps": 2}}.get(head, {})
    kw = {"head": head, "head_options": options, "calibration": rule}
    model, report = _fit(dataset, tmp_path, **kw)
    search = _ModelSearch(
        dataset, FitOptions(progress=False, cache_dir=tmp_path / "cache", folds=0, **kw)
    )
    fresh = calibrate(model, search.features(None), search.options)
    cal = report.calibration
    assert cal.method == rule
    assert cal.threshold == pytest.approx(fresh.threshold, rel=1e-5)
    assert (cal.map_low, cal.map_high) == pytest.approx((fresh.map_low, fresh.map_high), rel=1e-5)


def test_a_seed_among_the_head_options_is_the_heads(dataset, tmp_path):
    """``--head flow:seed=1`` seeds the head (its initial weights), not the fit's seed."""
    from vitqc.pipeline import FitOptions, _ModelSearch

    weights = {}
    for seed in (None, 1):
        options = {"steps": 2, **({} if seed is None else {"seed": seed})}
        search = _ModelSearch(
            dataset,
            FitOptions(head="flow", head_options=options, progress=False, cache_dir=tmp_path),
        )
        (cand, overrides), *_ = search.choices()
        head = search.build(cand, overrides, preview=False).head
        assert head.seed == (0 if seed is None else 1)
        weights[seed] = torch.cat([p.detach().flatten() for p in head.flows.parameters()])
    assert not torch.equal(weights[None], weights[1])
