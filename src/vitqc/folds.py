"""Out-of-fold normal scores: every good image scored by a model that did not see it.

A threshold resting on the validation split alone rests on a fifth of the good images;
with 50 to 150 of them the 1 % point is simply their maximum, and one odd image moves it.
Here the good training and validation images are split into k folds; for each fold a
model is fitted on the other folds and scores the held-out one, so every good image gets
one score from a model that never saw it. The final model is fitted as before; these
scores only feed the threshold and its stated FPR (``vitqc.calibration``).

What a fold model shares with the final one: the frozen backbone, the image
preprocessing fitted on the training split (a per-channel pixel range) and the chosen
configuration. Everything fitted to features (statistics, coresets, trained weights) is
fitted again on the fold's own images; trainable heads train for the final model's best
epoch count, without selection on the held-out fold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vitqc.scoring import AnomalyModel

DEFAULT_FOLDS = 5

__all__ = ["DEFAULT_FOLDS", "OutOfFold", "fold_ids", "out_of_fold_scores"]


def fold_ids(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """Seeded fold of each of ``n`` images; fold sizes differ by at most one."""
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


@dataclass
class OutOfFold:
    """``scores[i]`` is image i's score under the model of fold ``fold[i]``, which was
    fitted on the images of every other fold."""

    scores: np.ndarray
    fold: np.ndarray
    seconds: float

    def summary(self) -> dict[str, float | int]:
        return {
            "n": int(self.scores.size),
            "folds": int(self.fold.max()) + 1 if self.fold.size else 0,
            "seconds": self.seconds,
        }


def out_of_fold_scores(
    features: list[torch.Tensor],
    fit_model: Callable[[list[torch.Tensor]], AnomalyModel],
    score: Callable[[AnomalyModel, list[torch.Tensor]], np.ndarray],
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    progress: bool = True,
) -> OutOfFold:
    """Score each image of ``features`` (per layer ``[N, C, h, w]``) with a model that
    ``fit_model`` fitted on the other folds; ``score(model, held_out)`` gives their image
    scores. ``folds`` is capped at N (leave-one-out); needs N >= 2."""
    n = features[0].shape[0]
    if n < 2:
        raise ValueError(f"out-of-fold scores need at least 2 images, got {n}")
    folds = min(int(folds), n)
    ids = fold_ids(n, folds, seed)
    scores = np.full(n, np.nan)
    start = time.perf_counter()
    bar = tqdm(range(folds), desc="out-of-fold scores", unit="fold", disable=not progress)
    for k in bar:
        held = torch.from_numpy(np.flatnonzero(ids == k))
        kept = torch.from_numpy(np.flatnonzero(ids != k))
        model = fit_model([f[kept] for f in features])
        scores[held.numpy()] = score(model, [f[held] for f in features])
    bar.close()
    return OutOfFold(scores, ids, time.perf_counter() - start)
