"""Executors: where the cells of a benchmark grid run.

``run_grid`` expands the grid, skips finished cells, groups the others by data root,
category and backbone (``grid.group_cells``: the heads of a group share the backbone's
features) and hands the groups to an executor, which yields each cell's
``grid.CellResult`` as the cell finishes. Whatever the executor, the driver (the process
that runs ``run_grid``) is the only writer of the results database, one transaction per
cell as results arrive.

``LocalExecutor``
    the groups one after the other in this process (the default, ``--executor local``).
``RayExecutor``
    one Ray task per group on a Ray cluster (``--executor ray --address HOST:PORT``:
    ``ray start`` on each node, or KubeRay). A task is a generator: it yields each cell's
    result as the cell finishes, so rows stream back while the group's other heads run.

Both run a group through the same code, ``grid.run_group``: features are extracted once
per group and the other heads read them from the feature cache.

Faults on Ray. A failing cell is an error row and its group goes on, as locally. A lost
worker (killed, out of memory, its node gone) fails its task: the driver resubmits the
group's *unfinished* cells, at most ``max_retries`` times, then records them as failed.
(Ray's own task retry would re-execute a generator from its first item, refitting heads
whose rows are already stored, so tasks are submitted with Ray's ``max_retries=0`` and
the bounded retry is the driver's.) Ctrl-C on the driver cancels the tasks in flight;
rows already committed stay whole and a rerun skips them.

Artifacts. A Ray worker writes curves and galleries to a temporary folder and sends the
files back as bytes with the cell's result; the driver writes them before the row. With
``--artifacts DIR`` on a filesystem that every node mounts at the same path, workers
write there directly and send nothing.

Every node needs vitqc installed (the same version) and the data, the backbone weights
and ``--cache-dir`` (when given) at the same paths as on the driver.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from vitqc.atomic import atomic_dir, atomic_path
from vitqc.bench.grid import (
    Cell,
    CellGroup,
    CellResult,
    CellRunner,
    GridSpec,
    error_row,
    run_cell,
    run_group,
)
from vitqc.errors import VitqcError

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs groups of cells and yields each cell's result as it finishes."""

    def run(
        self,
        spec: GridSpec,
        groups: list[CellGroup],
        *,
        artifacts_root: Path,
        shared_artifacts: bool,
        cache_dir: Path | None,
        progress: bool,
        cell_runner: CellRunner,
        on_start: Callable[[Cell], None] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> Iterator[CellResult]: ...


# --------------------------------------------------------------------------- local


class LocalExecutor:
    """The groups one after the other in this process."""

    def run(
        self,
        spec: GridSpec,
        groups: list[CellGroup],
        *,
        artifacts_root: Path,
        shared_artifacts: bool = True,
        cache_dir: Path | None = None,
        progress: bool = True,
        cell_runner: CellRunner = run_cell,
        on_start: Callable[[Cell], None] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> Iterator[CellResult]:
        datasets: dict[tuple[Path, str | None], Any] = {}
        for cells in groups:
            yield from run_group(
                spec,
                cells,
                artifacts_root,
                cache_dir,
                progress=progress,
                cell_runner=cell_runner,
                datasets=datasets,
                on_start=on_start,
            )


# --------------------------------------------------------------------------- artifacts


def collect_artifact_files(root: Path, key: str) -> dict[str, bytes]:
    """A cell's artifact files under ``root`` (its run folder, its kept model, the
    category's gallery images) as path -> bytes; the cell's own folders are removed."""
    out: dict[str, bytes] = {}
    for sub in ("categories", f"runs/{key}", f"models/{key}"):
        base = root / sub
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    for sub in (f"runs/{key}", f"models/{key}"):
        shutil.rmtree(root / sub, ignore_errors=True)
    return out


def write_artifact_files(root: Path, files: Mapping[str, bytes]) -> None:
    """Write files sent by a worker under ``root``: shared category images one by one,
    each run (or model) folder whole (temporary folder + rename), as a local run does."""
    folders: dict[str, dict[str, bytes]] = {}
    for rel, data in files.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise VitqcError(f"a worker sent an artifact outside the artifacts folder: {rel}")
        if parts[0] in ("runs", "models") and len(parts) > 2:
            folders.setdefault("/".join(parts[:2]), {})["/".join(parts[2:])] = data
        else:
            with atomic_path(root / rel) as tmp:
                tmp.write_bytes(data)
    for folder, members in folders.items():
        with atomic_dir(root / folder) as tmp:
            for rel, data in members.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)


# --------------------------------------------------------------------------- ray


def ray_group_task(
    spec: GridSpec,
    cells: CellGroup,
    artifacts_dir: str | None,
    cache_dir: str | None,
    cell_runner: CellRunner = run_cell,
) -> Iterator[CellResult]:
    """The body of a Ray task: one group's cells on a worker, each result yielded as it
    finishes (with its artifact files as bytes unless ``artifacts_dir`` is shared)."""
    root = Path(artifacts_dir) if artifacts_dir else Path(tempfile.mkdtemp(prefix="vitqc-art-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else None
    try:
        for result in run_group(spec, cells, root, cache, progress=False, cell_runner=cell_runner):
            if not artifacts_dir:
                result.files = collect_artifact_files(root, result.key)
            yield result
    finally:
        if not artifacts_dir:
            shutil.rmtree(root, ignore_errors=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise VitqcError("--executor ray needs Ray: pip install 'ray==2.60.0'") from exc
    return ray


def use_private_token() -> None:
    """Token authentication for a Ray instance this process starts, with a token of its
    own in the environment (Ray would otherwise write ~/.ray/auth_token, after which every
    `ray start` on the machine asks drivers for that token). Leaves a set mode alone."""
    if not any(
        os.environ.get(v) for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A one-line error for an address nothing listens on (``ray.init`` would retry on)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise VitqcError(f"--address {address!r}: expected HOST:PORT (or auto)")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout).close()
    except OSError as exc:
        raise VitqcError(
            f"no Ray cluster at {address} ({exc.strerror or exc}): start one with "
            f"`ray start --head --port {port}` or check --address"
        ) from None


def _short(exc: BaseException) -> str:
    """One line for a Ray error (a task error names the exception raised in the task)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@dataclass
class _Attempt:
    spec: GridSpec
    cells: CellGroup
    tries: int  # how many earlier tasks of this group lost their worker
    label: str = ""


def _task_error() -> type[BaseException]:
    from ray.exceptions import RayTaskError

    return RayTaskError


@dataclass
class RayExecutor:
    """One Ray task per group of cells; results stream back as each cell finishes.

    ``address``: the cluster (``HOST:PORT`` or ``auto``; None: ``$RAY_ADDRESS``, else a
    Ray instance started here with ``num_cpus``). If this process is already connected
    (``ray.init`` called), that connection is used and left open. ``cpus_per_task`` /
    ``gpus_per_task``: what each task reserves (torch in a task uses that many threads).
    ``max_retries``: resubmissions of a group whose worker was lost.
    """

    address: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 2
    num_cpus: int | None = None
    init_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cpus_per_task <= 0:
            raise VitqcError(f"--cpus-per-task must be positive, got {self.cpus_per_task}")
        if self.gpus_per_task < 0:
            raise VitqcError(f"--gpus-per-task must be 0 or more, got {self.gpus_per_task}")
        if self.max_retries < 0:
            raise VitqcError(f"--max-retries must be 0 or more, got {self.max_retries}")

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.cpus_per_task))

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local instance); True when this call did, so must close."""
        if ray.is_initialized():
            return False
        options: dict[str, Any] = {"logging_level": "warning", **self.init_options}
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            options.setdefault("include_dashboard", False)
            options.setdefault("num_cpus", self.num_cpus)
            use_private_token()
        if self.address and self.address not in ("auto", "local") and "://" not in self.address:
            _check_reachable(self.address)
        try:
            ray.init(address=self.address, **options)
        except ConnectionError as exc:
            raise VitqcError(
                f"cannot connect to the Ray cluster at {self.address}: {exc} (a cluster with "
                "token authentication, which `ray start` turns on where ~/.ray/auth_token "
                "exists, needs RAY_AUTH_MODE=token and its token here)"
            ) from exc
        return True

    def _check_resources(self, ray: Any, echo: Callable[[str], None] | None) -> None:
        need = {"CPU": self.cpus_per_task, "GPU": self.gpus_per_task}
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(all(n["Resources"].get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
            return
        text = (
            f"no node of the Ray cluster has {self.cpus_per_task:g} CPUs and "
            f"{self.gpus_per_task:g} GPUs for one task: the tasks wait for such a node "
            "(an autoscaler may add one; Ctrl-C stops)"
        )
        if echo:
            echo(text)
        else:
            warnings.warn(text, stacklevel=3)

    def _after_failure(
        self,
        attempt: _Attempt,
        exc: BaseException,
        lost_worker: tuple[type[BaseException], ...],
        submit: Callable[[CellGroup, int], None],
        echo: Callable[[str], None] | None,
    ) -> Iterator[CellResult]:
        """A failed task: resubmit its unfinished cells (lost worker, retries left) or
        yield them as failed (retries exhausted, or an error no retry would change)."""
        tries = attempt.tries + 1
        retry = isinstance(exc, lost_worker) and not isinstance(exc, _task_error())
        if retry and tries <= self.max_retries:
            if echo:
                echo(
                    f"worker lost running {attempt.label} ({_short(exc)}): resubmitting its "
                    f"{len(attempt.cells)} unfinished cells (retry {tries} of {self.max_retries})"
                )
            submit(attempt.cells, tries)
            return
        if retry:
            message = (
                f"worker lost {tries} time(s), retries exhausted "
                f"(--max-retries {self.max_retries}): {_short(exc)}"
            )
        else:  # raised by the task outside a cell, or e.g. its runtime env failed
            message = f"the Ray task failed: {_short(exc)}"
        for cell, key in attempt.cells:
            yield CellResult(cell, key, error_row(cell, key, attempt.spec, message), {})

    def run(
        self,
        spec: GridSpec,
        groups: list[CellGroup],
        *,
        artifacts_root: Path,
        shared_artifacts: bool = False,
        cache_dir: Path | None = None,
        progress: bool = True,
        cell_runner: CellRunner = run_cell,
        on_start: Callable[[Cell], None] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> Iterator[CellResult]:
        if not groups:
            return
        ray = _import_ray()
        from ray import exceptions as rex

        lost_worker = tuple(
            getattr(rex, name)
            for name in (
                "WorkerCrashedError",
                "NodeDiedError",
                "LocalRayletDiedError",
                "OutOfMemoryError",
                "ObjectLostError",
                "ObjectFetchTimedOutError",
                "RaySystemError",
            )
            if hasattr(rex, name)
        )
        started = self._connect(ray)
        active: dict[Any, _Attempt] = {}
        try:
            self._check_resources(ray, echo)
            task = ray.remote(ray_group_task)
            threads = str(self.threads)
            env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            artifacts = str(artifacts_root) if shared_artifacts else None
            cache = str(cache_dir) if cache_dir else None
            spec_ref = ray.put(spec)

            def submit(cells: CellGroup, tries: int) -> None:
                first = cells[0][0]
                label = f"{first.category or first.data.name} | {first.backbone.label()}"
                gen = task.options(
                    name=f"vitqc[{label}]",
                    num_cpus=self.cpus_per_task,
                    num_gpus=self.gpus_per_task,
                    max_retries=0,
                    retry_exceptions=False,
                    runtime_env={"env_vars": env},
                ).remote(spec_ref, cells, artifacts, cache, cell_runner)
                active[gen] = _Attempt(spec, list(cells), tries, label)

            for cells in groups:
                submit(cells, 0)
            while active:
                ready, _ = ray.wait(list(active), num_returns=1, timeout=1.0)
                for gen in ready:
                    attempt = active[gen]
                    try:
                        result = ray.get(next(gen))
                    except StopIteration:
                        del active[gen]
                        for cell, key in attempt.cells:  # not expected: a task yields all
                            message = "the Ray task ended without this cell's result"
                            yield CellResult(cell, key, error_row(cell, key, spec, message), {})
                        continue
                    except rex.RayError as exc:
                        del active[gen]
                        if attempt.cells:
                            yield from self._after_failure(attempt, exc, lost_worker, submit, echo)
                        continue  # (a task lost after its last result has nothing to redo)
                    attempt.cells = [(c, k) for c, k in attempt.cells if k != result.key]
                    yield result
        finally:
            for gen in active:  # best effort on the way out
                with contextlib.suppress(Exception):
                    ray.cancel(gen, force=True)
            if started:
                ray.shutdown()


def make_executor(
    name: str,
    *,
    address: str | None = None,
    cpus_per_task: float | None = None,
    gpus_per_task: float | None = None,
    max_retries: int | None = None,
) -> Executor:
    """The executor ``vitqc benchmark --executor NAME`` asks for, its flags checked."""
    name = (name or "local").strip().lower()
    if name not in EXECUTORS:
        raise VitqcError(f"unknown --executor {name!r}: choose {' or '.join(EXECUTORS)}")
    ray_flags = {
        "--address": address,
        "--cpus-per-task": cpus_per_task,
        "--gpus-per-task": gpus_per_task,
        "--max-retries": max_retries,
    }
    if name == "local":
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise VitqcError(f"{', '.join(given)}: for --executor ray only")
        return LocalExecutor()
    return RayExecutor(
        address=address,
        cpus_per_task=1.0 if cpus_per_task is None else float(cpus_per_task),
        gpus_per_task=0.0 if gpus_per_task is None else float(gpus_per_task),
        max_retries=2 if max_retries is None else int(max_retries),
    )
