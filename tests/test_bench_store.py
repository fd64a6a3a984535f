"""Results store: schema version, one transaction per cell, reads, and a hand-made database
(``hand_made_db``) that the tables, recommendation and report tests share."""

from __future__ import annotations

import math
import sqlite3
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from vitqc.bench.store import SCHEMA_VERSION, artifacts_dir_for, open_store
from vitqc.errors import VitqcError

CATEGORIES = ("carpet", "grid", "screw")

# label -> (backbone, layers, head, per-category base metrics, ms b1, backbone params, head)
MODELS: dict[str, dict[str, Any]] = {
    "deit_flow": {
        "backbone": "deit_base_distilled_patch16_224",
        "layers": [11],
        "head": "flow",
        "image_auroc": 0.95,
        "image_prauc": 0.93,
        "aupro": 0.85,
        "ms": 40.0,
        "bb": 86_000_000,
        "hp": 5_000_000,
    },
    "deit_gmm": {
        "backbone": "deit_base_distilled_patch16_224",
        "layers": [11],
        "head": "gmm",
        "image_auroc": 0.85,
        "image_prauc": 0.97,
        "aupro": 0.80,
        "ms": 45.0,
        "bb": 86_000_000,
        "hp": 30_000_000,
    },
    "eff_flow": {
        "backbone": "efficientformer_l3",
        "layers": [3],
        "head": "flow",
        "image_auroc": 0.90,
        "image_prauc": 0.88,
        "aupro": 0.82,
        "ms": 12.0,
        "bb": 31_000_000,
        "hp": 3_000_000,
    },
    "resnet_flow": {  # dominated by eff_flow: less accurate, slower, bigger
        "backbone": "resnet50",
        "layers": [2, 3, 4],
        "head": "flow",
        "image_auroc": 0.80,
        "image_prauc": 0.80,
        "aupro": 0.75,
        "ms": 15.0,
        "bb": 25_000_000,
        "hp": 10_000_000,
    },
    "eff_knn": {  # the best localization
        "backbone": "efficientformer_l3",
        "layers": [3],
        "head": "knn",
        "image_auroc": 0.83,
        "image_prauc": 0.86,
        "aupro": 0.93,
        "ms": 30.0,
        "bb": 31_000_000,
        "hp": 8_000_000,
    },
}
# per-category offsets, so means and stds are easy to check
OFFSETS = {"carpet": 0.02, "grid": 0.0, "screw": -0.02}


def make_run(name: str, category: str, **extra: Any) -> dict[str, Any]:
    m = MODELS[name]
    off = OFFSETS[category]
    return {
        "cell_key": f"{name}-{category}",
        "status": "ok",
        "dataset": "mvtec",
        "category": category,
        "backbone": m["backbone"],
        "layers": m["layers"],
        "weights": "hub",
        "head": m["head"],
        "method": name,
        "config_json": {"model": name, "category": category},
        "image_auroc": m["image_auroc"] + off,
        "image_prauc": m["image_prauc"] + off,
        "aupro": m["aupro"] + off,
        "pixel_auroc": 0.9 + off,
        "f1": 0.8,
        "precision": 0.8,
        "recall": 0.8,
        "threshold": 1.5,
        "metrics_json": {"image_auroc": m["image_auroc"] + off},
        "feature_seconds": 3.0,
        "head_seconds": 10.0,
        "backbone_ms_b1": m["ms"] * 0.8,
        "backbone_ms_b32": m["ms"] * 0.3,
        "pipeline_ms_b1": m["ms"],
        "pipeline_ms_b32": m["ms"] * 0.4,
        "backbone_params": m["bb"],
        "head_params": m["hp"],
        "bundle_bytes": m["hp"] * 4,
        "feature_channels": [768] if m["backbone"].startswith("deit") else [512],
        "feature_sizes": [[14, 14]] if m["backbone"].startswith("deit") else [[7, 7]],
        "device": "cpu",
        "cpu_model": "test cpu",
        "threads": 2,
        "torch_version": "2.x",
        "vitqc_version": "0.1.0",
        **extra,
    }


def hand_made_db(
    path: Path,
    models: tuple[str, ...] = tuple(MODELS),
    artifacts_from: Path | None = None,
) -> Path:
    """A results database with known numbers; with ``artifacts_from`` (a synthetic
    dataset root) every run also gets curves and a gallery, as the grid writes them."""
    dataset = None
    if artifacts_from is not None:
        from vitqc.data.layouts import load_dataset

        dataset = load_dataset(artifacts_from, category="tile")
    with open_store(path) as store:
        for name in models:
            for category in CATEGORIES:
                extra: dict[str, Any] = {}
                if dataset is not None:
                    extra["artifacts"] = _fake_artifacts(
                        store.artifacts_dir, name, category, dataset
                    )
                store.record(
                    make_run(name, category, **extra),
                    {
                        "crack": {
                            "image_auroc": 0.9,
                            "pixel_auroc": 0.95,
                            "aupro": 0.8,
                            "n_test": 3,
                        },
                        "hole": {"image_auroc": 0.7},
                    },
                )
        store.record(
            {
                "cell_key": "broken",
                "status": "error",
                "dataset": "mvtec",
                "category": "carpet",
                "backbone": "no_such_backbone",
                "head": "flow",
                "method": "flow / no_such_backbone",
                "config_json": {},
                "error": "unknown backbone 'no_such_backbone'",
            }
        )
    return path


def _fake_artifacts(root: Path, name: str, category: str, dataset: Any) -> str:
    from vitqc.bench.artifacts import select_gallery, write_run_artifacts

    rng = np.random.default_rng(zlib.crc32(f"{name}/{category}".encode()))
    n = len(dataset.test)
    labels = np.array([s.label for s in dataset.test])
    quality = MODELS[name]["image_auroc"]
    scores = labels * quality + rng.uniform(0, 0.6, n)
    maps = rng.uniform(0, 0.5, (n, 24, 24)).astype(np.float32)
    maps[labels == 1, 8:16, 8:16] += quality
    rel = f"runs/{name}-{category}"
    write_run_artifacts(
        root,
        rel,
        dataset="mvtec",
        category=category,
        samples=dataset.test,
        scores=scores,
        maps=maps,
        model=None,
        gallery=select_gallery(dataset.test, 1, 2),
    )
    return rel


# --------------------------------------------------------------------------- tests


def test_schema_version_and_reopen(tmp_path):
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        assert store.counts() == {"ok": 0, "error": 0}
        assert store.artifacts_dir == artifacts_dir_for(db) == tmp_path / "r_artifacts"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == str(SCHEMA_VERSION)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(VitqcError, match="newer"):
        open_store(db)


def test_a_store_created_by_another_process_meanwhile_is_opened(tmp_path, monkeypatch):
    """Two processes opening one new database: the second may read "no schema yet" just
    before the first commits it; it re-checks under the write lock and opens it (before,
    it called the other's fresh tables a foreign database)."""
    db = tmp_path / "r.sqlite"
    connect = sqlite3.connect

    class RacedConnection(sqlite3.Connection):
        raced = False

        def execute(self, sql, *args):
            if sql != "PRAGMA user_version" or RacedConnection.raced:
                return super().execute(sql, *args)
            rows = super().execute(sql, *args).fetchall()  # read (and its lock) done
            RacedConnection.raced = True  # the other process commits its schema now
            monkeypatch.setattr(sqlite3, "connect", connect)
            open_store(db).close()
            return SimpleNamespace(fetchone=lambda: rows[0])

    monkeypatch.setattr(
        sqlite3, "connect", lambda *a, **k: connect(*a, factory=RacedConnection, **k)
    )
    with open_store(db) as store:
        assert RacedConnection.raced
        assert store.counts() == {"ok": 0, "error": 0}


def test_refuses_foreign_files(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(VitqcError, match="junk.sqlite"):
        open_store(junk)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(VitqcError, match="not a vitqc results database"):
        open_store(other)
    with pytest.raises(VitqcError, match="not found"):
        open_store(tmp_path / "missing.sqlite", create=False)


def test_record_round_trip_and_replace(tmp_path):
    with open_store(tmp_path / "r.sqlite") as store:
        run = make_run("deit_flow", "grid", pixel_auroc=float("nan"))
        store.record(run, {"crack": {"image_auroc": 0.5, "n_test": 2}, "hole": {}})
        (row,) = store.runs()
        assert row["pixel_auroc"] is None  # nan is stored as NULL
        assert row["layers"] == [11] and row["feature_sizes"] == [[14, 14]]
        assert row["config"] == {"model": "deit_flow", "category": "grid"}
        assert row["per_defect"]["crack"] == {
            "image_auroc": 0.5,
            "pixel_auroc": None,
            "aupro": None,
            "n_test": 2,
        }
        assert row["created_at"]
        assert store.status_of("deit_flow-grid") == "ok"
        assert store.status_of("nope") is None
        # same cell key: replaced, old per-defect rows gone with it
        store.record({**run, "image_auroc": 0.1}, {"scratch": {"image_auroc": 0.3}})
        (row,) = store.runs()
        assert math.isclose(row["image_auroc"], 0.1)
        assert list(row["per_defect"]) == ["scratch"]
        n = store.conn.execute("SELECT COUNT(*) FROM per_defect").fetchone()[0]
        assert n == 1
        with pytest.raises(ValueError, match="unknown run columns"):
            store.record({**run, "bogus": 1})


class _InterruptingConnection:
    """Delegates to a real connection but raises Ctrl-C at the per-defect insert."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("INSERT INTO per_defect"):
            raise KeyboardInterrupt
        return self._conn.execute(sql, *args)


def test_interrupt_inside_a_write_leaves_no_half_row(tmp_path):
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        store.record(make_run("eff_flow", "grid"))
        real = store.conn
        store.conn = _InterruptingConnection(real)  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):
            store.record(make_run("deit_flow", "grid"), {"crack": {"image_auroc": 0.5}})
        store.conn = real
    with open_store(db) as store:
        assert store.integrity_ok()
        assert [r["cell_key"] for r in store.runs()] == ["eff_flow-grid"]
        assert store.status_of("deit_flow-grid") is None


def test_hand_made_db(tmp_path):
    db = hand_made_db(tmp_path / "h.sqlite")
    with open_store(db, create=False) as store:
        assert store.counts() == {"ok": len(MODELS) * len(CATEGORIES), "error": 1}
        (err,) = store.runs("error")
        assert "no_such_backbone" in err["error"]


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cell_key TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL, error TEXT, dataset TEXT NOT NULL, category TEXT NOT NULL,
    backbone TEXT NOT NULL, layers TEXT, weights TEXT, head TEXT NOT NULL,
    method TEXT NOT NULL, config_json TEXT NOT NULL, image_auroc REAL, pixel_auroc REAL,
    aupro REAL, image_prauc REAL, f1 REAL, precision REAL, recall REAL, threshold REAL,
    metrics_json TEXT, feature_seconds REAL, head_seconds REAL, eval_seconds REAL,
    backbone_ms_b1 REAL, backbone_ms_b32 REAL, pipeline_ms_b1 REAL, pipeline_ms_b32 REAL,
    features_reused INTEGER, backbone_params INTEGER, head_params INTEGER,
    bundle_bytes INTEGER, feature_channels TEXT, feature_sizes TEXT, input_size TEXT,
    n_train INTEGER, n_val INTEGER, n_test INTEGER, cpu_model TEXT, threads INTEGER,
    torch_version TEXT, device TEXT, machine_json TEXT, vitqc_version TEXT,
    created_at TEXT NOT NULL, artifacts TEXT
);
CREATE TABLE per_defect (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    defect_type TEXT NOT NULL, image_auroc REAL, n_test INTEGER,
    PRIMARY KEY (run_id, defect_type)
);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO runs (cell_key, status, dataset, category, backbone, head, method, config_json,
    metrics_json, created_at)
VALUES ('old', 'ok', 'mvtec', 'grid', 'deit', 'flow', 'deit+flow', '{}',
    '{"per_defect_type": {"crack": {"image_auroc": 0.9, "pixel_auroc": 0.97,
      "aupro": 0.85, "n_test": 3}, "hole": {"image_auroc": 0.6, "n_test": 1}}}',
    '2026-01-01T00:00:00+00:00');
INSERT INTO per_defect VALUES (1, 'crack', 0.9, 3), (1, 'hole', 0.6, 1);
PRAGMA user_version = 1;
"""


def test_a_schema_1_database_is_upgraded_with_its_rows(tmp_path):
    """Schema 1 kept only image AUROC per defect type: opening it adds the localization
    columns, filled from each run's stored metrics (NULL where it had none), keeps every
    row, and new rows record all three figures."""
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_1)
    conn.close()
    with open_store(db, create=False) as store:
        assert store.meta("schema_version") == str(SCHEMA_VERSION) == "2"
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        (old,) = store.runs()
        assert old["cell_key"] == "old"
        assert old["per_defect"] == {
            "crack": {"image_auroc": 0.9, "pixel_auroc": 0.97, "aupro": 0.85, "n_test": 3},
            "hole": {"image_auroc": 0.6, "pixel_auroc": None, "aupro": None, "n_test": 1},
        }
        store.record(
            make_run("eff_flow", "grid"),
            {"crack": {"image_auroc": 0.5, "pixel_auroc": 0.7, "aupro": 0.4, "n_test": 2}},
        )
        assert store.runs()[1]["per_defect"]["crack"]["aupro"] == 0.4
    with open_store(db) as store:  # opened again: nothing left to upgrade
        assert [r["cell_key"] for r in store.runs()] == ["old", "eff_flow-grid"]
        assert store.integrity_ok()
