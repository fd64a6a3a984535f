"""On-disk feature cache keyed by image content and extraction settings.

Running the frozen backbone dominates training time on CPU, and the features of an image
only depend on its pixels and on the settings (backbone, layers, weights, input size,
preprocessor statistics). So features are stored per image under

    <root>/<settings key>/settings.json
    <root>/<settings key>/<sha[:2]>/<sha>.safetensors   (tensors "layer0", "layer1", ...)

where ``settings key`` hashes the extractor and preprocessor fingerprints (plus the
pipeline version) and ``sha`` is the sha256 of the image file's bytes (of the pixel array
for in-memory samples). A changed image or setting gets a different file name, so stale
features are never returned. Files are written atomically; an unreadable or mis-shaped
entry is recomputed.

Features are stored as float32: float16 would halve the size, but the density heads
(flows, mixtures) are sensitive to small feature perturbations in their log-likelihoods,
and exact equality between cached and fresh features keeps results reproducible.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vitqc.atomic import atomic_path, write_json
from vitqc.backbones.extractor import FeatureExtractor
from vitqc.data.io import load_image
from vitqc.data.records import Sample
from vitqc.data.transforms import Preprocessor, resize_batch, resize_tensor
from vitqc.errors import VitqcError

#: Bump when decoding, resizing or storage changes, so old cache entries are not reused
#: (2: EXIF orientation applied).
PIPELINE_VERSION = 2


def default_cache_root() -> Path:
    """``$VITQC_CACHE`` or ``~/.cache/vitqc/features``."""
    env = os.environ.get("VITQC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitqc" / "features"


def image_content_hash(sample: Sample) -> str:
    """sha256 of the image file's bytes, or of the in-memory pixels (with their shape)."""
    digest = hashlib.sha256()
    if sample.array is not None:
        arr = np.ascontiguousarray(load_image(sample))
        digest.update(f"array:{arr.shape}:{arr.dtype}:".encode())
        digest.update(arr.tobytes())
        return digest.hexdigest()
    if sample.path is None:
        raise VitqcError(f"sample {sample.key} has neither a path nor pixels")
    try:
        with open(sample.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise VitqcError(f"image not found: {sample.path}") from exc
    except OSError as exc:
        raise VitqcError(f"cannot read image {sample.path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def settings_key(extractor: FeatureExtractor, preprocessor: Preprocessor) -> str:
    blob = f"v{PIPELINE_VERSION}:{extractor.fingerprint()}:{preprocessor.fingerprint()}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _check_sizes(extractor: FeatureExtractor, preprocessor: Preprocessor) -> None:
    if tuple(preprocessor.image_size) != tuple(extractor.input_size):
        raise VitqcError(
            f"preprocessor image size {preprocessor.image_size} differs from the backbone's "
            f"input size {extractor.input_size}"
        )


def compute_features(
    extractor: FeatureExtractor, preprocessor: Preprocessor, images: torch.Tensor
) -> list[torch.Tensor]:
    """Features of a ``[B, 3, H, W]`` batch in [0, 1], without the cache (for inference).

    Images not at the backbone's input size are resized with the same filter as
    ``resize_batch``, so this matches what ``FeatureCache.extract`` computes.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise VitqcError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    x = resize_tensor(images.float(), extractor.input_size)
    p = next(extractor.parameters(), None)
    if p is not None:
        x = x.to(p.device)
    with torch.inference_mode():
        x = preprocessor.to(x.device)(x)
    return extractor(x)


class FeatureCache:
    """Content-addressed features on disk: computed once per (settings, image)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()

    def settings_dir(self, extractor: FeatureExtractor, preprocessor: Preprocessor) -> Path:
        return self.root / settings_key(extractor, preprocessor)

    @staticmethod
    def _entry(folder: Path, sha: str) -> Path:
        return folder / sha[:2] / f"{sha}.safetensors"

    def _write_settings(
        self, folder: Path, extractor: FeatureExtractor, preprocessor: Preprocessor
    ) -> None:
        path = folder / "settings.json"
        if path.exists():
            return
        try:
            write_json(
                path,
                {
                    "pipeline_version": PIPELINE_VERSION,
                    "backbone": extractor.spec_dict(),
                    "preprocessor": preprocessor.config(),
                    "feature_shapes": [list(s) for s in extractor.feature_shapes()],
                },
            )
        except OSError as exc:
            raise VitqcError(f"cannot write to the feature cache {folder}: {exc}") from exc

    @staticmethod
    def _read(path: Path, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor] | None:
        """The cached maps, or None when missing, unreadable or of unexpected shape."""
        if not path.is_file():
            return None
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None
        feats = [data.get(f"layer{i}") for i in range(len(shapes))]
        if any(f is None or tuple(f.shape) != s for f, s in zip(feats, shapes, strict=True)):
            return None
        return feats  # type: ignore[return-value]

    @staticmethod
    def _write(path: Path, feats: list[torch.Tensor]) -> None:
        tensors = {f"layer{i}": f.contiguous().cpu() for i, f in enumerate(feats)}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp))

    def extract(
        self,
        extractor: FeatureExtractor,
        preprocessor: Preprocessor,
        samples: Sequence[Sample],
        batch_size: int = 32,
        progress: bool = True,
    ) -> list[torch.Tensor]:
        """One ``[N, C, h, w]`` float32 tensor per layer, rows in the order of ``samples``.

        Cached images are read from disk; the others are loaded, resized to the
        backbone's input size, preprocessed and run through the backbone in batches.
        """
        _check_sizes(extractor, preprocessor)
        if batch_size < 1:
            raise VitqcError(f"batch size must be at least 1, got {batch_size}")
        shapes = extractor.feature_shapes()
        n = len(samples)
        out = [torch.empty(n, *s, dtype=torch.float32) for s in shapes]
        if n == 0:
            return out
        folder = self.settings_dir(extractor, preprocessor)
        self._write_settings(folder, extractor, preprocessor)

        # Rows that share content (duplicates) are computed once.
        rows_by_sha: dict[str, list[int]] = {}
        first_sample: dict[str, Sample] = {}
        for i, sample in enumerate(samples):
            sha = image_content_hash(sample)
            rows_by_sha.setdefault(sha, []).append(i)
            first_sample.setdefault(sha, sample)

        todo: list[str] = []
        for sha, rows in rows_by_sha.items():
            cached = self._read(self._entry(folder, sha), shapes)
            if cached is None:
                todo.append(sha)
                continue
            for layer, f in enumerate(cached):
                out[layer][rows] = f
        if not todo:
            return out

        bar = tqdm(
            total=len(todo),
            desc=f"features {extractor.name} ({n - len(todo)} cached)",
            unit="img",
            disable=not progress,
            leave=False,
        )
        p = next(extractor.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        pre = preprocessor.to(device)
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                x01 = resize_batch(
                    [load_image(first_sample[s], preprocessor.white_level) for s in chunk],
                    extractor.input_size,
                )
                with torch.inference_mode():
                    x = pre(x01.to(device))
                feats = [f.cpu() for f in extractor(x)]
                for j, sha in enumerate(chunk):
                    per_image = [f[j].clone() for f in feats]
                    try:
                        self._write(self._entry(folder, sha), per_image)
                    except OSError as exc:
                        raise VitqcError(
                            f"cannot write to the feature cache {folder}: {exc}"
                        ) from exc
                    rows = rows_by_sha[sha]
                    for layer, f in enumerate(per_image):
                        out[layer][rows] = f
                bar.update(len(chunk))
        finally:
            bar.close()
        return out
