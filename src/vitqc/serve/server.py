"""``vitqc serve``: prepare the model, bind the socket, run uvicorn.

A bundle folder is exported to ONNX first (``vitqc export`` in a child process, so the
serving process never imports torch); an ``.onnx`` file is served as it is. The model
is opened and the socket bound before uvicorn starts, so a bad model, a port in use or
a bad option is one ``VitqcError`` line. uvicorn limits open connections to
``connection_limit(config)`` (each can hold at most one body of ``--max-body-mb``),
which together with the bounded queue bounds the server's memory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from vitqc.errors import VitqcError
from vitqc.serve.config import ServeConfig

__all__ = ["connection_limit", "export_for_serving", "run_server"]


def connection_limit(config: ServeConfig) -> int:
    """Open connections uvicorn accepts (beyond: its own 503): room for every admitted
    request plus as many again being uploaded or turned away, and some spare."""
    return 2 * config.capacity + 32


def export_for_serving(bundle: Path, out: Path) -> Path:
    """``vitqc export BUNDLE --out OUT`` in a child process; its one-line error if any."""
    proc = subprocess.run(
        [sys.executable, "-m", "vitqc.cli", "export", str(bundle), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    if proc.returncode != 0 or not out.is_file():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise VitqcError(f"cannot export {bundle} for serving: {last.removeprefix('error: ')}")
    return out


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise VitqcError(f"--host {host}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise VitqcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def run_server(model_path: Path, echo: Callable[[str], None] = print, **options: object) -> None:
    """Serve ``model_path`` (bundle folder or ``.onnx``) until interrupted. ``options``
    are ``ServeConfig`` fields."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise VitqcError(f"model not found: {model_path}")
    ServeConfig(model=model_path, **options)  # every option checked before any work

    import uvicorn

    from vitqc.runtime import ExportedModel
    from vitqc.serve.app import create_app

    with tempfile.TemporaryDirectory(prefix="vitqc-serve-") as tmp:
        onnx_path = model_path
        if model_path.is_dir():
            echo(f"exporting {model_path} to ONNX for serving ...")
            onnx_path = export_for_serving(model_path, Path(tmp) / "model.onnx")
        config = ServeConfig(model=onnx_path, **options)
        model = ExportedModel(onnx_path, threads=config.onnx_threads)
        sock = _bind(config.host, config.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        echo(
            f"serving model {model.info.get('model_id', '?')[:12]} on http://{shown}:{port} "
            f"({config.workers} worker(s) x {config.onnx_threads} thread(s), queue "
            f"{config.max_queue}; API docs at /docs"
            + (", API key required" if config.api_key else "")
            + (f"; decisions logged to {config.log_results}" if config.log_results else "")
            + ")"
        )
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, model),
                log_level="warning",
                access_log=False,
                limit_concurrency=connection_limit(config),
                timeout_keep_alive=5,
                timeout_graceful_shutdown=10,
                server_header=False,
            )
        )
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
