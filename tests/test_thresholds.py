"""Thresholds from out-of-fold normal scores, with their FPR stated (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitqc.data.layouts import load_dataset
from vitqc.folds import fold_ids, out_of_fold_scores
from vitqc.heads import create_head


@pytest.fixture(scope="module")
def dataset(synth_root):
    return load_dataset(synth_root, category="tile", seed=0)


def _memory_head(features):
    """A nearest-neighbour head that keeps every patch: an image it saw scores ~0."""
    head = create_head(
        "knn",
        [f.shape[1] for f in features],
        [tuple(f.shape[-2:]) for f in features],
        coreset_ratio=1.0,
        neighbourhood=1,
    )
    head.prepare(features)
    return head


def test_fold_ids_are_balanced_seeded_and_cover_every_image():
    ids = fold_ids(23, 5, seed=0)
    assert sorted(np.bincount(ids)) == [4, 4, 5, 5, 5]
    assert np.array_equal(ids, fold_ids(23, 5, seed=0))
    assert not np.array_equal(ids, fold_ids(23, 5, seed=1))


def test_out_of_fold_scores_never_come_from_a_model_that_saw_the_image():
    torch.manual_seed(0)
    features = [torch.randn(17, 8, 4, 4)]
    fitted_on: list[set[int]] = []
    ident = features[0][:, 0, 0, 0]  # a fingerprint of each image

    def fit_model(kept):
        fitted_on.append({int(torch.argmin((ident - v).abs())) for v in kept[0][:, 0, 0, 0]})
        return _memory_head(kept)

    def score(head, held):
        return head(held).flatten(1).amax(1).numpy()

    oof = out_of_fold_scores(features, fit_model, score, folds=5, seed=0, progress=False)
    assert len(fitted_on) == 5
    for k, seen in enumerate(fitted_on):
        held = set(np.flatnonzero(oof.fold == k).tolist())
        assert held and not held & seen and held | seen == set(range(17))
    # the memory head scores an image it saw at ~0 (its own patches are in the bank);
    # every out-of-fold score is far from 0: no model saw the image it scored
    seen_all = score(_memory_head(features), features)
    assert seen_all.max() < 0.05
    assert oof.scores.min() > 20 * seen_all.max()
    assert oof.summary()["n"] == 17 and oof.summary()["folds"] == 5


def test_fit_rests_the_threshold_on_every_good_image(dataset, tmp_path):
    from vitqc.pipeline import FitOptions, fit

    options = FitOptions(head="gaussian", statistics="position", progress=False)
    model, report = fit(dataset, options)
    cal = report.calibration
    n_good = len(dataset.train) + len(dataset.val)
    assert cal.normal_source == "out-of-fold" and cal.n_normal == n_good
    assert report.out_of_fold["n"] == n_good and report.out_of_fold["folds"] == 5
    lo, hi = cal.fpr_interval
    assert lo < cal.expected_fpr < hi and cal.fpr_beta is not None
    # 20 good images support 1/21 at best: the default target is raised, and says so
    assert cal.requested_target_fpr == 0.01 and cal.target_fpr == pytest.approx(1 / 21)
    assert float(model.threshold) == cal.threshold
    # with folds=0 the threshold rests on the validation images only, as before
    _, val_only = fit(
        dataset, FitOptions(head="gaussian", statistics="position", folds=0, progress=False)
    )
    assert val_only.calibration.normal_source == "validation"
    assert val_only.calibration.n_normal == len(dataset.val) and val_only.out_of_fold is None


def test_trainable_fold_models_train_the_final_best_epoch_count_without_selection(
    dataset, monkeypatch
):
    from vitqc import pipeline

    calls = []
    real = pipeline.train_head

    def spy(head, train, val, config, select=None):
        calls.append((train[0].shape[0], val is None, select is None, config))
        return real(head, train, val, config, select=select)

    monkeypatch.setattr(pipeline, "train_head", spy)
    options = pipeline.FitOptions(
        head="flow",
        head_options={"steps": 2},
        statistics="position",
        select="loss",  # NLL falls over the first epochs: the best epoch is not the start
        epochs=3,
        steps_per_epoch=2,  # the fold models' epochs are as long as the final model's
        progress=False,
    )
    model, report = pipeline.fit(dataset, options)
    final, *folds = calls
    assert final[1] is False  # the final model selects on validation
    n_good = len(dataset.train) + len(dataset.val)
    assert report.train.best_epoch > 0 and len(folds) == 5
    assert final[3].steps_per_epoch == 2
    for n_fit, no_val, no_select, config in folds:
        assert no_val and no_select and config.epochs == report.train.best_epoch
        assert config.steps_per_epoch == 2
        assert n_good * 3 // 5 <= n_fit < n_good


def test_threshold_options_are_checked_before_any_work(dataset, tmp_path):
    from vitqc.errors import VitqcError
    from vitqc.pipeline import FitOptions, defect_samples, fit

    with pytest.raises(VitqcError, match="--val-defects"):
        fit(dataset, FitOptions(head="gaussian", calibration="f1", progress=False))
    test_defects = defect_samples(dataset.test[0].path.parent.parent)  # the test folder
    with pytest.raises(VitqcError, match="holds test images"):
        fit(
            dataset,
            FitOptions(head="gaussian", calibration="f1", val_defects=test_defects),
        )
    with pytest.raises(VitqcError, match="--min-area must be 0 or more"):
        fit(dataset, FitOptions(head="gaussian", min_area=-1))
    with pytest.raises(VitqcError, match="--threshold-folds"):
        fit(dataset, FitOptions(head="gaussian", folds=-1))
    with pytest.raises(VitqcError, match="--steps-per-epoch must be 1 or more"):
        fit(dataset, FitOptions(head="flow", steps_per_epoch=0))
    # 4 validation images cannot support 5 %: refused up front, naming the lowest target
    with pytest.raises(VitqcError, match=r"lowest target they support is 20\.00%"):
        fit(dataset, FitOptions(head="gaussian", folds=0, target_fpr=0.05))
