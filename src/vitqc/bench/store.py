"""The benchmark results store: one embedded SQLite file, one row per finished grid cell.

Why SQLite: a single file the user can copy, query with any tool and reopen after a crash.
Every cell is written in *one* transaction (its run row and its per-defect-type rows
together), so a crash, a kill or Ctrl-C leaves either the whole cell or nothing; a rerun of
the same grid finds the finished cells by their ``cell_key`` and skips them.

Schema (version ``SCHEMA_VERSION``, also in ``PRAGMA user_version`` and table ``meta``):

``runs``
    one row per cell. ``cell_key`` (unique) is the hash of the cell's configuration;
    ``status`` is ``ok`` or ``error`` (``error`` holds the message). Identity columns
    (dataset, category, backbone, layers, weights, head, method) are split out for the
    tables; ``config_json`` is the full configuration. Metrics (``image_auroc``,
    ``pixel_auroc``, ``aupro``, ``image_prauc``, ``f1``, ``precision``, ``recall``,
    ``threshold``) are fractions in [0, 1] (NULL when undefined); ``metrics_json`` is the
    whole ``evaluate_predictions`` dict. Timing: ``feature_seconds``, ``head_seconds``,
    ``eval_seconds``; latency in ms per image for the backbone alone and the full
    pipeline at batch 1 and 32. Sizes: ``backbone_params``, ``head_params``,
    ``bundle_bytes``, ``feature_channels`` / ``feature_sizes`` (JSON). Machine:
    ``cpu_model``, ``threads``, ``torch_version``, ``device``, ``machine_json``.
    ``artifacts`` is the cell's folder (curves and gallery) relative to the artifacts
    folder beside the database.
``per_defect``
    ``(run_id, defect_type)`` -> ``image_auroc``, ``pixel_auroc``, ``aupro`` (the
    localization figures of that type's images against every good image; NULL without
    masks), ``n_test``.
``meta``
    key/value: ``schema_version``, ``created_at``, and ``artifacts_dir`` when the first
    run chose the artifacts folder (``--artifacts``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vitqc.errors import VitqcError

SCHEMA_VERSION = 2
DEFAULT_DB = "results.sqlite"

METRIC_COLUMNS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_prauc",
    "f1",
    "precision",
    "recall",
    "threshold",
)
#: A defect type's figures in ``per_defect`` (schema 2 added the localization ones).
PER_DEFECT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
TIMING_COLUMNS = (
    "feature_seconds",
    "head_seconds",
    "eval_seconds",
    "backbone_ms_b1",
    "backbone_ms_b32",
    "pipeline_ms_b1",
    "pipeline_ms_b32",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    cell_key         TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error            TEXT,
    dataset          TEXT NOT NULL,
    category         TEXT NOT NULL,
    backbone         TEXT NOT NULL,
    layers           TEXT,
    weights          TEXT,
    head             TEXT NOT NULL,
    method           TEXT NOT NULL,
    config_json      TEXT NOT NULL,
    {", ".join(f"{c} REAL" for c in METRIC_COLUMNS)},
    metrics_json     TEXT,
    {", ".join(f"{c} REAL" for c in TIMING_COLUMNS)},
    features_reused  INTEGER,
    backbone_params  INTEGER,
    head_params      INTEGER,
    bundle_bytes     INTEGER,
    feature_channels TEXT,
    feature_sizes    TEXT,
    input_size       TEXT,
    n_train          INTEGER,
    n_val            INTEGER,
    n_test           INTEGER,
    cpu_model        TEXT,
    threads          INTEGER,
    torch_version    TEXT,
    device           TEXT,
    machine_json     TEXT,
    vitqc_version    TEXT,
    created_at       TEXT NOT NULL,
    artifacts        TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_cell ON runs (dataset, category, backbone, head);
CREATE TABLE IF NOT EXISTS per_defect (
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    defect_type  TEXT NOT NULL,
    {", ".join(f"{c} REAL" for c in PER_DEFECT_METRICS)},
    n_test       INTEGER,
    PRIMARY KEY (run_id, defect_type)
);
"""


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Schema 2: ``per_defect`` holds the localization figures too, filled for earlier
    rows from the run's stored metrics where they have them."""
    for column in ("pixel_auroc", "aupro"):
        conn.execute(f"ALTER TABLE per_defect ADD COLUMN {column} REAL")
    runs = conn.execute("SELECT id, metrics_json FROM runs WHERE metrics_json IS NOT NULL")
    for run_id, metrics_json in runs.fetchall():
        per_type = json.loads(metrics_json).get("per_defect_type") or {}
        for defect_type, vals in per_type.items():
            conn.execute(
                "UPDATE per_defect SET pixel_auroc = ?, aupro = ? "
                "WHERE run_id = ? AND defect_type = ?",
                (
                    _clean_float(vals.get("pixel_auroc")),
                    _clean_float(vals.get("aupro")),
                    run_id,
                    str(defect_type),
                ),
            )


#: ``_MIGRATIONS[v]`` brings a database of schema ``v`` to ``v + 1``.
_MIGRATIONS = {1: _migrate_1_to_2}

# Columns a caller may set through ``ResultsStore.record``; everything else is derived.
_RUN_COLUMNS = (
    "cell_key",
    "status",
    "error",
    "dataset",
    "category",
    "backbone",
    "layers",
    "weights",
    "head",
    "method",
    "config_json",
    *METRIC_COLUMNS,
    "metrics_json",
    *TIMING_COLUMNS,
    "features_reused",
    "backbone_params",
    "head_params",
    "bundle_bytes",
    "feature_channels",
    "feature_sizes",
    "input_size",
    "n_train",
    "n_val",
    "n_test",
    "cpu_model",
    "threads",
    "torch_version",
    "device",
    "machine_json",
    "vitqc_version",
    "created_at",
    "artifacts",
)
_JSON_COLUMNS = ("layers", "feature_channels", "feature_sizes", "input_size")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def artifacts_dir_for(db_path: str | Path) -> Path:
    """Curves, galleries and kept models live beside the database: ``<stem>_artifacts/``."""
    db_path = Path(db_path)
    return db_path.with_name(f"{db_path.stem}_artifacts")


def _clean_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _sanitize(obj: Any) -> Any:
    """nan/inf become None so stored JSON is strict."""
    if isinstance(obj, Mapping):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any) -> str:
    return json.dumps(_sanitize(obj), sort_keys=True, default=_json_default)


class ResultsStore:
    """A connection to one results database; create it with :func:`open_store`.

    Use as a context manager (or call :meth:`close`). Reads return plain dicts with the
    JSON columns decoded, so tables, recommendation and report never touch SQL.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception (Ctrl-C too) rolls back."""
        return _write_transaction(self.conn)

    @property
    def artifacts_dir(self) -> Path:
        """``<stem>_artifacts/`` beside the database, or the folder its first run chose."""
        chosen = self.meta("artifacts_dir")
        return Path(chosen) if chosen else artifacts_dir_for(self.path)

    def use_artifacts_dir(self, folder: str | Path) -> Path:
        """Keep the artifacts in ``folder`` (``--artifacts``), fixed by the first run: rows
        point into one folder, so another folder for a database with rows is refused."""
        folder = Path(folder).expanduser().resolve()
        current = self.artifacts_dir.resolve()
        if folder != current:
            (n,) = self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()
            if n:
                raise VitqcError(
                    f"{self.path} keeps its artifacts in {current}: pass --artifacts "
                    f"{current} or use a new --db"
                )
        if folder != artifacts_dir_for(self.path).resolve() or self.meta("artifacts_dir"):
            with self.transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('artifacts_dir', ?)",
                    (str(folder),),
                )
        return folder

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ----------------------------------------------------------------- writes

    def record(
        self,
        run: Mapping[str, Any],
        per_defect: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Insert (or replace) one cell's row and its per-defect rows in one transaction.

        An earlier row with the same ``cell_key`` is replaced (a retried error cell, or a
        forced rerun); its per-defect rows go with it.
        """
        unknown = set(run) - set(_RUN_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run columns: {sorted(unknown)}")
        if "cell_key" not in run or "status" not in run:
            raise ValueError("a run needs cell_key and status")
        row = dict(run)
        row.setdefault("created_at", now_iso())
        for col in METRIC_COLUMNS + TIMING_COLUMNS:
            if col in row:
                row[col] = _clean_float(row[col])
        for col in (*_JSON_COLUMNS, "config_json", "metrics_json", "machine_json"):
            if col in row and row[col] is not None and not isinstance(row[col], str):
                row[col] = to_json(row[col])
        for col in ("dataset", "category", "backbone", "head", "method", "config_json"):
            row.setdefault(col, "")
        cols = list(row)
        sql = f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        with self.transaction() as conn:
            conn.execute("DELETE FROM runs WHERE cell_key = ?", (row["cell_key"],))
            cur = conn.execute(sql, [row[c] for c in cols])
            run_id = int(cur.lastrowid or 0)
            for defect_type, vals in (per_defect or {}).items():
                conn.execute(
                    f"INSERT INTO per_defect (run_id, defect_type, "
                    f"{', '.join(PER_DEFECT_METRICS)}, n_test) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        str(defect_type),
                        *(_clean_float(vals.get(m)) for m in PER_DEFECT_METRICS),
                        vals.get("n_test"),
                    ),
                )
        return run_id

    def delete(self, cell_key: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM runs WHERE cell_key = ?", (cell_key,))

    # ----------------------------------------------------------------- reads

    def status_of(self, cell_key: str) -> str | None:
        """``"ok"``, ``"error"`` or None (never run): what the grid uses to resume."""
        row = self.conn.execute(
            "SELECT status FROM runs WHERE cell_key = ?", (cell_key,)
        ).fetchone()
        return None if row is None else str(row[0])

    def runs(self, status: str | None = "ok") -> list[dict[str, Any]]:
        """All rows (oldest first) with JSON columns decoded and ``per_defect`` attached."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        cur = self.conn.execute(f"SELECT * FROM runs {where} ORDER BY id", args)
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        per: dict[int, dict[str, dict[str, Any]]] = {}
        for run_id, defect_type, *figures, n in self.conn.execute(
            f"SELECT run_id, defect_type, {', '.join(PER_DEFECT_METRICS)}, n_test "
            "FROM per_defect ORDER BY defect_type"
        ):
            per.setdefault(run_id, {})[defect_type] = {
                **dict(zip(PER_DEFECT_METRICS, figures, strict=True)),
                "n_test": n,
            }
        for row in rows:
            for col in (*_JSON_COLUMNS, "config_json", "metrics_json", "machine_json"):
                if row.get(col):
                    row[col] = json.loads(row[col])
            row["config"] = row.pop("config_json")
            row["metrics"] = row.pop("metrics_json")
            row["machine"] = row.pop("machine_json")
            row["per_defect"] = per.get(row["id"], {})
        return rows

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "error": 0}
        for status, n in self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            out[str(status)] = int(n)
        return out

    def integrity_ok(self) -> bool:
        row = self.conn.execute("PRAGMA integrity_check").fetchone()
        return row is not None and row[0] == "ok"


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock) ... ``COMMIT``; any exception (Ctrl-C too)
    rolls back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _stamp_schema(conn: sqlite3.Connection) -> None:
    """Mark the database as ``SCHEMA_VERSION`` (``meta`` and ``PRAGMA user_version``)."""
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring an older database to ``SCHEMA_VERSION`` in one transaction (its rows kept),
    under the write lock: another process may be upgrading it at the same time."""
    with _write_transaction(conn):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        while version < SCHEMA_VERSION:
            _MIGRATIONS[version](conn)
            version += 1
        _stamp_schema(conn)


def open_store(path: str | Path = DEFAULT_DB, create: bool = True) -> ResultsStore:
    """Open (and with ``create`` make) a results database, checking its schema version.

    A database written by a newer vitqc (higher schema version) is refused rather than
    misread; an older one is upgraded in place, keeping its rows (``_MIGRATIONS``); a
    file that is not SQLite is a one-line error naming it.
    """
    path = Path(path)
    if not create and not path.is_file():
        raise VitqcError(f"results database not found: {path} (run `vitqc benchmark` first)")
    if path.exists() and path.is_dir():
        raise VitqcError(f"results database {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: autocommit, so our explicit BEGIN/COMMIT are the transactions.
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise VitqcError(
                f"{path} has results schema {version}, newer than this vitqc's "
                f"({SCHEMA_VERSION}): upgrade vitqc"
            )
        if version == 0:
            # under the write lock: another process may have created the schema since
            # the version was read (it commits tables and version together)
            with _write_transaction(conn):
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                has_tables = conn.execute(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()[0]
                if version:  # created meanwhile
                    return ResultsStore(path, conn)
                if has_tables:
                    raise VitqcError(f"{path} is an SQLite file but not a vitqc results database")
                if not create:
                    raise VitqcError(f"{path} is not a vitqc results database")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('created_at', ?)",
                    (now_iso(),),
                )
                _stamp_schema(conn)
        elif version < SCHEMA_VERSION:
            _upgrade(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise VitqcError(f"cannot open results database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return ResultsStore(path, conn)
