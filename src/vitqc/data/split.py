"""The seeded train/validation split of the good training images.

Validation images drive early stopping, score normalization and thresholds, so the split
must be reproducible: the same files and seed give the same split on every machine,
whatever order the file system lists them in (samples are sorted by key first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitqc.data.records import Sample
from vitqc.errors import VitqcError


def split_train_val(
    samples: Sequence[Sample],
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    source: str | Path | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Split good images into ``(train, val)``, each returned sorted by key.

    ``round(n * val_fraction)`` images go to validation, clamped so that both parts hold
    at least one image when there are two or more (a single image stays in train);
    ``val_fraction=0`` gives an empty validation set. ``source`` (the training folder)
    only names the folder in the error for an empty set.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise VitqcError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if len(samples) == 0:
        where = f" in {source}" if source is not None else ""
        raise VitqcError(f"empty training set: no good images found{where}")
    ordered = sorted(samples, key=lambda s: s.key)
    counts = Counter(s.key for s in ordered)
    if len(counts) != len(ordered):
        dup = sorted(k for k, c in counts.items() if c > 1)[:3]
        raise VitqcError(f"duplicate sample keys in the training set: {', '.join(dup)}")
    n = len(ordered)
    n_val = int(round(n * float(val_fraction)))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    elif n < 2:
        n_val = 0
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [s for i, s in enumerate(ordered) if i not in val_idx]
    val = [s for i, s in enumerate(ordered) if i in val_idx]
    return train, val
