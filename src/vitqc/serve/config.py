"""The service's settings (``vitqc serve`` options), checked once with one-line errors."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from vitqc.errors import VitqcError

__all__ = ["API_KEY_ENV", "ServeConfig"]

#: Environment variable read for the API key when ``--api-key`` is not given
API_KEY_ENV = "VITQC_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """What the service needs. ``model`` is an exported ``.onnx`` file by the time the
    app is created (``vitqc.serve.server`` exports a bundle folder first)."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_queue: int = 8
    threads: int | None = None
    api_key: str | None = None
    log_results: Path | None = None
    max_body_mb: float = 20.0
    max_pixels: int = 40_000_000
    max_batch: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise VitqcError(f"--workers must be between 1 and 64, got {self.workers}")
        if not 0 <= self.max_queue <= 10_000:
            raise VitqcError(f"--max-queue must be between 0 and 10000, got {self.max_queue}")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise VitqcError(f"--threads must be between 1 and 256, got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise VitqcError(f"--port must be between 0 and 65535, got {self.port}")
        if not self.host.strip():
            raise VitqcError("--host must not be empty")
        if not (math.isfinite(self.max_body_mb) and 0 < self.max_body_mb <= 4096):
            raise VitqcError(f"--max-body-mb must be in (0, 4096], got {self.max_body_mb}")
        if not 1 <= self.max_pixels <= 2**40:
            raise VitqcError(f"--max-pixels must be positive, got {self.max_pixels}")
        if not 1 <= self.max_batch <= 1024:
            raise VitqcError(f"the batch limit must be between 1 and 1024, got {self.max_batch}")
        if self.api_key is not None and not self.api_key.strip():
            raise VitqcError(f"--api-key (or {API_KEY_ENV}) must not be empty when given")
        if self.log_results is not None:
            log = Path(self.log_results)
            if log.is_dir():
                raise VitqcError(f"--log-results {log} is a directory: name a file")
            if not log.parent.is_dir():
                raise VitqcError(f"--log-results {log}: folder {log.parent} does not exist")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def capacity(self) -> int:
        """Requests admitted at once: one per worker plus the queue."""
        return self.workers + self.max_queue

    @property
    def onnx_threads(self) -> int:
        """onnxruntime threads per worker: ``threads`` or the cores shared out."""
        if self.threads:
            return int(self.threads)
        return max(1, (os.cpu_count() or 1) // self.workers)
