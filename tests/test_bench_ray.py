"""The benchmark grid on a real local Ray cluster (``ray start --head`` from the venv).

A tiny grid (three backbone groups x two heads on synthetic data; two CPUs, so two
groups run at a time) goes through ``vitqc benchmark --executor ray --address ...``.
Run 1 loses a worker (SIGKILL, ``--max-retries 0``: its unfinished cell is recorded as
failed) and is then stopped with Ctrl-C. Run 2 (``--retry-failed``, one retry) loses a
worker again: its group's unfinished cells are resubmitted and the grid completes.
Every cell is then in the database exactly once, whole, with the local executor's
metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vitqc.bench.executors import (
    LocalExecutor,
    RayExecutor,
    collect_artifact_files,
    make_executor,
    write_artifact_files,
)
from vitqc.bench.grid import BackboneChoice, GridSpec, expand_grid, run_grid, spec_from_config
from vitqc.bench.store import open_store
from vitqc.errors import VitqcError

RAY = Path(sys.executable).with_name("ray")
GRID = {
    "backbones": [
        {"name": "test_resnet", "weights": "random"},
        {"name": "test_resnet", "weights": "random", "layers": [2]},
        {"name": "test_resnet", "weights": "random", "layers": [3]},
    ],
    "heads": ["gmm", "knn"],
    "epochs": 1,
    "patience": 1,
    "head_options": {"gmm": {"n_components": 4}},
    "timing": False,
    "gallery_good": 1,
    "gallery_defective": 2,
}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> Iterator[tuple[int, int, int, str]]:
    """(pid, ppid, process group, command line) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        yield int(entry.name), int(fields[1]), int(fields[2]), cmdline


def _ray_env() -> dict[str, str]:
    """The environment of the cluster and its drivers: token authentication with a token
    of this test (whatever ~/.ray/auth_token holds), one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Cluster:
    """A one-node Ray cluster of this test, in its own process group and temp folder."""

    def __init__(self) -> None:
        # a short path: Ray's unix sockets live under it (108-byte limit)
        self.tmp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
        self.address = f"127.0.0.1:{_free_port()}"
        self.log = self.tmp / "start.log"
        ports = {
            "--node-manager-port": _free_port(),
            "--object-manager-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(),
            "--metrics-export-port": _free_port(),
        }
        args = [str(RAY), "start", "--head", "--block", "--num-cpus", "2"]
        args += ["--port", self.address.rsplit(":", 1)[1], "--node-ip-address", "127.0.0.1"]
        args += ["--temp-dir", str(self.tmp), "--include-dashboard=false"]
        args += ["--disable-usage-stats"]
        for flag, port in ports.items():
            args += [flag, str(port)]
        self.env = _ray_env()
        env = {**self.env, "RAY_USAGE_STATS_ENABLED": "0"}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self.address

    def raylet(self) -> int:
        for pid, _, pgid, cmd in _processes():
            if pgid == self.proc.pid and "/raylet" in cmd.split(" ", 1)[0]:
                return pid
        raise RuntimeError("no raylet in the test cluster")

    def task_worker(self, group: str) -> int | None:
        """The pid of this cluster's worker running the task of ``group``, if any."""
        raylet = self.raylet()
        for pid, ppid, _, cmd in _processes():
            if ppid == raylet and cmd.startswith(f"ray::vitqc[{group}]"):
                return pid
        return None

    def benchmark(self, out: Path, *args: str) -> subprocess.Popen:
        """``vitqc benchmark ... --executor ray --address`` this cluster, output to ``out``."""
        command = [sys.executable, "-m", "vitqc.cli", "benchmark", *args]
        command += ["--executor", "ray", "--address", self.address]
        return subprocess.Popen(
            command,
            stdout=out.open("w"),
            stderr=subprocess.STDOUT,
            env=self.env,
            # a suite started in the background (a CI runner) ignores SIGINT, and the
            # driver would inherit that: give it Ctrl-C as a terminal would
            preexec_fn=_default_sigint,
        )

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` stops what it started; the group's leftovers go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()  # starts in the background while the test runs the local reference
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from vitqc.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("ray-data") / "synth"
    generate_synthetic(root, n_train=10, n_test_good=3, n_test_defective=4, size=64, seed=1)
    return root


def _rows(db: Path) -> list[dict[str, Any]]:
    """The committed rows, read without the store (the driver holds it open)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY id")]
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        conn.close()


def _wait(what: str, condition: Callable[[], Any], alive: Callable[[], bool], timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not alive():
            break
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _group(label: str) -> str:
    """A cell's group, the name of its Ray task: ``category | backbone``."""
    return label.rsplit(" | ", 1)[0]


def _kill_mid_group(
    cluster: Cluster, db: Path, keys: dict[str, str], old_ids: set[int]
) -> Callable[[], int | None]:
    """A condition: kill the worker of a group that committed a new row (not one of
    ``old_ids``) and has cells left in this run; the killed pid, or None."""
    old = {r["cell_key"] for r in _rows(db) if r["id"] in old_ids and r["status"] == "ok"}
    todo = Counter(_group(label) for key, label in keys.items() if key not in old)

    def attempt() -> int | None:
        new = Counter(_group(keys[r["cell_key"]]) for r in _rows(db) if r["id"] not in old_ids)
        for group, n in new.items():
            pid = cluster.task_worker(group) if n < todo[group] else None
            if pid:
                os.kill(pid, signal.SIGKILL)
                return pid
        return None

    return attempt


def test_grid_on_a_ray_cluster_survives_lost_workers_and_ctrl_c(cluster, data_root, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**GRID, "data": [str(data_root)]}), encoding="utf-8")
    spec = spec_from_config({**GRID, "data": [str(data_root)]})
    keys = {c.key(spec): c.label() for c in expand_grid(spec)}
    assert len(keys) == 6

    # the reference: the local executor, same seeds (while the cluster starts)
    local_db = tmp_path / "local.sqlite"
    summary = run_grid(spec, local_db, cache_dir=tmp_path / "c-local", progress=False)
    assert summary.ok == 6
    with open_store(local_db) as store:
        local = {r["cell_key"]: r for r in store.runs()}

    cluster.wait_ready()
    db = tmp_path / "ray.sqlite"

    # run 1: lose a worker mid-group (no retry), then Ctrl-C
    args = ["--config", str(config), "--db", str(db), "--cache-dir", str(tmp_path / "c-ray")]
    out = tmp_path / "run1.log"
    proc = cluster.benchmark(out, *args, "--max-retries", "0", "--cpus-per-task", "1")
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        # Ctrl-C right after the kill, while the killed group still has cells: waiting
        # for the lost cell's row first let a quiet machine finish the grid before it
        _wait("a worker mid-group", _kill_mid_group(cluster, db, keys, set()), alive, 150)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.read_text()
    assert proc.returncode == 130 and "Traceback" not in log, log[-3000:]  # typer's Ctrl-C
    with open_store(db) as store:
        assert store.integrity_ok()
        first = store.runs(None)
    # the lost cell is recorded as failed if the driver saw the loss before the Ctrl-C
    failed = [r for r in first if r["status"] == "error"]
    assert len(failed) <= 1
    for lost in failed:
        assert "(--max-retries 0): WorkerCrashedError" in lost["error"]
        assert "worker lost 1 time(s), retries exhausted" in log
    done = {r["cell_key"]: r["id"] for r in first if r["status"] == "ok"}
    assert 1 <= len(done) <= 3, "Ctrl-C stops the grid before the third group ran"
    assert all(r["per_defect"] for r in first if r["status"] == "ok")

    # run 2: the failed and the unfinished cells; a worker is lost again, once retried
    out = tmp_path / "run2.log"
    args += ["--retry-failed", "--max-retries", "1"]
    args += ["--artifacts", str(tmp_path / "ray_artifacts")]  # "shared": workers write there
    proc = cluster.benchmark(out, *args)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        kill = _kill_mid_group(cluster, db, keys, {r["id"] for r in first})
        _wait("a worker mid-group", kill, alive, 150)
        proc.wait(150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.read_text()
    assert proc.returncode == 0, log[-3000:]
    n = len(done)
    assert f"resuming: {n} cells done, 0 failed earlier, {6 - n} to run" in log
    assert "worker lost running tile | test_resnet" in log and "(retry 1 of 1)" in log
    assert f"6 cells: {6 - n} ran ok, 0 failed, {n} already done" in log

    with open_store(db) as store:
        assert store.integrity_ok()
        runs = store.runs(None)
        root = store.artifacts_dir
    # every cell exactly once, whole; the cells finished in run 1 were not rerun
    assert sorted(r["cell_key"] for r in runs) == sorted(keys)
    assert all(r["status"] == "ok" for r in runs)
    assert {r["cell_key"]: r["id"] for r in runs if r["cell_key"] in done} == done
    for run in runs:
        ref = local[run["cell_key"]]
        assert run["per_defect"] and run["per_defect"] == ref["per_defect"]
        assert run["metrics"] == ref["metrics"], keys[run["cell_key"]]
        for col in ("image_auroc", "pixel_auroc", "aupro", "image_prauc", "threshold"):
            assert run[col] == ref[col], (keys[run["cell_key"]], col)
        assert run["machine"]["hostname"] == socket.gethostname() and run["threads"] == 1
        curves = root / run["artifacts"] / "curves.json"
        assert curves.is_file(), run["artifacts"]  # sent as bytes (run 1) or written there
        for entry in json.loads(curves.read_text())["gallery"]:
            assert (root / entry["image"]).is_file() and (root / entry["overlay"]).is_file()


# --------------------------------------------------------------------------- no cluster


def test_executor_flags():
    assert isinstance(make_executor("local"), LocalExecutor)
    ray = make_executor("ray", address="127.0.0.1:1", cpus_per_task=2.5, max_retries=0)
    assert isinstance(ray, RayExecutor)
    assert (ray.cpus_per_task, ray.gpus_per_task, ray.max_retries, ray.threads) == (2.5, 0, 0, 2)
    with pytest.raises(VitqcError, match="--address, --gpus-per-task: for --executor ray only"):
        make_executor("local", address="x", gpus_per_task=1)
    with pytest.raises(VitqcError, match="unknown --executor 'dask'"):
        make_executor("dask")
    with pytest.raises(VitqcError, match="--cpus-per-task"):
        make_executor("ray", cpus_per_task=0)
    import ray

    with pytest.raises(VitqcError, match="no Ray cluster at 127.0.0.1:1 "):
        RayExecutor(address="127.0.0.1:1")._connect(ray)
    assert not ray.is_initialized()


def test_artifact_files_travel_as_bytes(tmp_path):
    worker, driver = tmp_path / "w", tmp_path / "d"
    files = {
        "runs/k1/curves.json": b"{}",
        "runs/k1/overlay_0.png": b"png",
        "runs/k2/curves.json": b"other cell",
        "categories/synth__tile/0_image.png": b"img",
    }
    for rel, data in files.items():
        (worker / rel).parent.mkdir(parents=True, exist_ok=True)
        (worker / rel).write_bytes(data)
    (worker / "runs/k1/.curves.json.tmp").write_bytes(b"half")
    sent = collect_artifact_files(worker, "k1")
    assert sent == {k: v for k, v in files.items() if "k2" not in k}
    assert not (worker / "runs/k1").exists() and (worker / "runs/k2").exists()
    write_artifact_files(driver, sent)
    assert {p.relative_to(driver).as_posix() for p in driver.rglob("*") if p.is_file()} == set(sent)
    with pytest.raises(VitqcError, match="outside the artifacts folder"):
        write_artifact_files(driver, {"../evil": b""})


def _stub_cell(cell, spec, dataset, *args: Any, **kwargs: Any):
    row = {"dataset": dataset.name, "category": dataset.category}
    row |= {"backbone": cell.backbone.name, "head": cell.head, "method": cell.head}
    return row, {}


def test_artifacts_folder_is_fixed_by_the_first_run(data_root, tmp_path):
    db = tmp_path / "a.sqlite"
    chosen = tmp_path / "shared" / "art"
    spec = GridSpec([data_root], [BackboneChoice("bb")], ["flow"], epochs=1)
    run_grid(spec, db, progress=False, cell_runner=_stub_cell, artifacts_dir=chosen)
    with open_store(db) as store:
        assert store.artifacts_dir == chosen.resolve()
        assert store.use_artifacts_dir(chosen) == chosen.resolve()
        with pytest.raises(VitqcError, match="keeps its artifacts in"):
            store.use_artifacts_dir(tmp_path / "elsewhere")
