"""Images that show the same part: perceptual hashes compared across a dataset's splits.

A part photographed twice (another exposure, another day) gives two pictures that differ
in every pixel but look alike. When one is a good training image and the other a test
image, the test figures measure memory rather than generalization; when the test image
is *defective*, the training picture may show the same defect, labelled good, and a
model that learns the training pictures (a memory bank above all) learns the defect as
normal. ``vitqc inspect`` lists such pairs for a person to review.

Two pictures look alike when their 256-bit DCT hashes (``imagehash.phash``; robust to
exposure, resizing and compression) differ in at most ``MAX_DISTANCE`` bits. The
search is faiss's exact Hamming search.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Side of the DCT hash: 16 x 16 = 256 bits.
HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
#: Largest hash distance (bits of 256) at which two pictures count as the same part. On
#: magnetic_tile, where each tile was photographed at up to six exposures, 186 of 191
#: good test images lie within it of a training image; on kolektorsdd, whose parts
#: were photographed once, the nearest training image of a test image is 86 bits away.
MAX_DISTANCE = 64


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """The packed ``[HASH_BITS / 8]`` uint8 DCT hash of a picture (``[H, W]`` or
    ``[H, W, C]`` uint8, as ``io.read_image`` gives it)."""
    import imagehash  # 0.1 s of imports, only for inspection

    bits = imagehash.phash(Image.fromarray(image), hash_size=HASH_SIZE).hash
    return np.packbits(bits.ravel())


def pixel_digest(image: np.ndarray) -> str:
    """A digest of the decoded pixels and their shape: equal for copies of one picture,
    whatever their file names or formats (lossless ones)."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Lookalike:
    """The nearest reference picture of a query picture (indices into the two lists)."""

    query: int
    reference: int
    distance: int


def nearest_lookalikes(
    queries: np.ndarray, references: np.ndarray, max_distance: int = MAX_DISTANCE
) -> list[Lookalike]:
    """For each row of ``queries [N, HASH_BITS / 8]`` that lies within ``max_distance``
    bits of a row of ``references``, the nearest such row."""
    if not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"max_distance must be 0 to {HASH_BITS} bits, got {max_distance}")
    if len(queries) == 0 or len(references) == 0:
        return []
    import faiss  # 0.1 s of imports, only for inspection

    index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(np.ascontiguousarray(references, dtype=np.uint8))
    distances, found = index.search(np.ascontiguousarray(queries, dtype=np.uint8), 1)
    return [
        Lookalike(int(q), int(found[q, 0]), int(distances[q, 0]))
        for q in range(len(queries))
        if found[q, 0] >= 0 and distances[q, 0] <= max_distance
    ]
