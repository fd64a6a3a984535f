"""``--log-results``: every decision appended to a file as one JSON line.

Each line goes to the file in one ``write`` on a descriptor opened with ``O_APPEND``
(no user-space buffer), then ``fsync``: a crash of the service loses at most the line it
was writing, never leaves part of one behind for the next line to run into. A file left
with a partial last line by a power cut is cut back to its last complete line on open.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["ResultLog"]


class ResultLog:
    """An append-only JSON-lines file shared by the inference workers (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._repair()

    def _repair(self) -> None:
        """Cut a partial last line (a crash mid-write under another writer) away."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        end, block = size, 1 << 16
        keep = 0
        while end > 0:
            start = max(0, end - block)
            chunk = os.pread(self._fd, end - start, start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        print(
            f"warning: {self.path} ended in a partial line ({size - keep} bytes): cut away",
            file=sys.stderr,
        )

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as one line, durably."""
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError("the results log is closed")
            view = memoryview(line)
            while view:  # one write for any line a decision makes; looped for safety
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
