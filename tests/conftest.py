"""Shared fixtures: real data locations and a small synthetic dataset made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAGNETIC_TILE = SHARED / "magnetic_tile"
MNIST = SHARED / "mnist"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write features or converted weights into the user's home cache from tests."""
    monkeypatch.setenv("VITQC_CACHE", str(tmp_path_factory.getbasetemp() / "feature-cache"))
    monkeypatch.setenv("VITQC_WEIGHTS_CACHE", str(tmp_path_factory.getbasetemp() / "weights-cache"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from vitqc.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, n_train=20, n_test_good=6, n_test_defective=8, size=96, seed=0)
    return root


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available at {path} (expected ../shared/data beside the repo)")
    return path


os.environ.setdefault("TQDM_DISABLE", "1")
