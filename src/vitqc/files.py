"""File helpers shared by the modules that fingerprint files (weights, wheels, bundles)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(*paths: str | os.PathLike[str]) -> str:
    """Hex sha256 of the bytes of one file (or of several, in order), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
