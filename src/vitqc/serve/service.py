"""The inference side of the service: one ONNX session, a fixed pool of workers and a
bounded number of admitted requests.

``InferenceService.submit`` admits a job only while fewer than ``workers + max_queue``
are running or waiting; otherwise it raises ``Overloaded`` at once (the app answers 503
with ``Retry-After``), so the backlog never grows without bound. Jobs run on
``workers`` threads sharing one onnxruntime session (its ``run`` is thread-safe and
releases the GIL). Scoring is ``vitqc.runtime.ExportedModel.score_images``: the same
preprocessing and decision (``vitqc.decision``) as ``python -m vitqc.runtime``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from vitqc.runtime import ExportedModel
from vitqc.serve.config import ServeConfig
from vitqc.serve.images import decode
from vitqc.serve.overlay import overlay_png_base64
from vitqc.serve.results_log import ResultLog

__all__ = ["InferenceService", "Overloaded", "Upload"]

T = TypeVar("T")


class Overloaded(Exception):
    """Every worker is busy and the queue is full."""


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its bytes and a name for messages and the log."""

    data: bytes
    name: str


class InferenceService:
    """The loaded model, its worker pool, admission control and the results log."""

    def __init__(self, config: ServeConfig, model: ExportedModel | None = None) -> None:
        self.config = config
        self.model = model or ExportedModel(config.model, threads=config.onnx_threads)
        self.model_id = str(self.model.info.get("model_id"))
        self._slots = threading.BoundedSemaphore(config.capacity)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="vitqc-worker")
        self.log = ResultLog(config.log_results) if config.log_results else None
        self.started = time.time()

    def warm_up(self) -> None:
        """Runs on a blank image, then (where ``/predict/batch`` takes more than one) a
        blank batch of two, before the first request: onnxruntime allocates on its
        first call, and the first batch splits the graph and times its call sizes
        (``ExportedModel.run``; seconds on a large model). The graph's parts then
        serve single images too, so the model's constants are held once."""
        h, w = self.model.input_size
        blank = np.zeros((h, w, 3), dtype=np.uint8)
        self.model.score_images([blank])
        if self.config.max_batch > 1:
            self.model.score_images([blank, blank])

    async def submit(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a worker; ``Overloaded`` at once when no slot is free.
        The slot is held until the job ends, even when its client has gone."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded
        try:
            future = self._pool.submit(self._release_after, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        return await asyncio.wrap_future(future)

    def _release_after(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        finally:
            self._slots.release()

    def score(
        self, uploads: Sequence[Upload], threshold: float | None, want_map: bool
    ) -> list[dict[str, Any]]:
        """Decode and score each upload in turn (one full-size image in memory at a time);
        the decisions go to the results log once all of them are made. Raises
        ``ImageRejected`` for an upload that cannot be decoded."""
        rows, records = [], []
        for upload in uploads:
            image = decode(upload.data, upload.name, self.config.max_pixels, self.model.white_level)
            row = self.model.score_images([image], threshold, maps=want_map)[0]
            operator_map = row.pop("map", None)
            digest = hashlib.sha256(upload.data).hexdigest()
            row.update(
                model=self.model_id,
                file=upload.name,
                width=int(image.shape[1]),
                height=int(image.shape[0]),
                sha256=digest,
            )
            if operator_map is not None:
                row["map_png"] = overlay_png_base64(
                    image,
                    operator_map,
                    self.model.map_low,
                    self.model.threshold,
                    row["threshold"],
                )
            del image
            rows.append(row)
            records.append(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "model": self.model_id,
                    "file": upload.name,
                    "sha256": digest,
                    "score": row["score"],
                    "normalized_score": row["normalized_score"],
                    "threshold": row["threshold"],
                    "defective": row["defective"],
                    "decision": "defective" if row["defective"] else "good",
                    **{k: row[k] for k in ("min_area_px", "largest_region_px") if k in row},
                }
            )
        if self.log is not None:
            for record in records:
                self.log.write(record)
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        if self.log is not None:
            self.log.close()
