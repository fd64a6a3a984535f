"""The records every dataset layout produces, so the rest of vitqc sees one interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class Sample:
    """One image with its ground truth.

    ``label`` is 0 for good, 1 for defective. ``mask_path`` is None for good images and
    for defective images whose mask is missing (those count for image metrics only).
    In-memory datasets (MNIST) carry the pixels in ``array`` and have ``path=None``.
    ``key`` is a stable identifier, unique within a dataset (relative path or index).
    """

    key: str
    label: int
    defect_type: str
    path: Path | None = None
    mask_path: Path | None = None
    array: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_defective(self) -> bool:
        return self.label == 1


@dataclass
class Dataset:
    """One category of one dataset, already split.

    ``train`` and ``val`` are good images only (the seeded 80/20 split of the training
    folder); ``test`` is for evaluation only and is never used for fitting, early
    stopping, normalization or thresholds.
    """

    name: str
    category: str
    format: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    has_masks: bool = True
    #: Side of every image when the format fixes it (MNIST: 28 x 28); models that see
    #: raw pixels default to it instead of upsampling.
    native_size: tuple[int, int] | None = None

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.is_defective})
