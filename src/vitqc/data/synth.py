"""A synthetic MVTec-layout dataset: the embedded default for demos, tests and smoke runs.

It needs no download and no license, yet behaves like a real inspection task: a tiled,
mottled surface whose good images all differ (brightness, color tint, texture phase, grout
position, per-tile shade), and five kinds of small defects. Each defect's mask is drawn
first and the defect is painted *through* it, so the mask is exactly the set of changed
pixels (every masked pixel changes by at least ``MIN_DELTA`` grey levels, no other pixel
changes). Defects cover about 0.1-3% of the image, well below the image-to-image brightness
spread, so the mean intensity of an image says little about whether it is defective.

Everything is drawn from ``numpy.random.default_rng`` seeded per image, and PNGs carry no
timestamps: the same arguments give byte-identical files.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from vitqc.atomic import atomic_dir
from vitqc.errors import VitqcError

DEFECT_TYPES = ("scratch", "hole", "stain", "crack", "missing_piece")
MIN_DELTA = 12  # smallest change, in grey levels (max over channels), of a defect pixel

_BASE_COLOR = np.array([178.0, 165.0, 148.0])
_GROUT_LEVEL = 0.62


@dataclass(frozen=True)
class Material:
    """What all images of one dataset share: a periodic mottle texture and the tile grid."""

    size: int
    texture: np.ndarray  # float32 [size, size], zero mean, unit std, periodic
    period: int  # tile pitch in pixels
    grout: int  # grout line width in pixels


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    return a / (a.std() + 1e-8)


def make_material(size: int, seed: int = 0) -> Material:
    """The shared texture: multi-scale smoothed noise plus a faint brushed direction."""
    rng = np.random.default_rng([seed, 7919])
    scale = size / 256.0
    tex = np.zeros((size, size))
    for sigma, weight in ((2.0, 0.35), (6.0, 0.55), (16.0, 0.6)):
        noise = rng.standard_normal((size, size))
        tex += weight * _unit(ndimage.gaussian_filter(noise, sigma * scale, mode="wrap"))
    brushed = ndimage.gaussian_filter(
        rng.standard_normal((size, size)), (0.6 * scale, 12 * scale), mode="wrap"
    )
    tex += 0.3 * _unit(brushed)
    return Material(
        size=size,
        texture=_unit(tex).astype(np.float32),
        period=max(16, size // 4),
        grout=max(2, round(size / 100)),
    )


def make_surface(material: Material, rng: np.random.Generator) -> np.ndarray:
    """One good image, uint8 ``[S, S, 3]``: the material at a random phase and lighting."""
    s, period = material.size, material.period
    dy, dx = (int(v) for v in rng.integers(0, s, 2))
    mottle = np.roll(material.texture, (dy, dx), axis=(0, 1))
    grain = _unit(ndimage.gaussian_filter(rng.standard_normal((s, s)), 0.8))
    py, px = (int(v) for v in rng.integers(0, period, 2))
    yy = (np.arange(s) + py)[:, None]
    xx = (np.arange(s) + px)[None, :]
    n_tiles = s // period + 2
    tile_shade = rng.normal(0.0, 0.025, (n_tiles, n_tiles))[yy // period, xx // period]
    in_grout = ((yy % period) < material.grout) | ((xx % period) < material.grout)
    grout = ndimage.gaussian_filter(in_grout.astype(np.float64), 0.6)
    surface = 1.0 + 0.055 * mottle + 0.02 * grain + tile_shade
    grout_lum = _GROUT_LEVEL + 0.03 * grain
    lum = surface * (1.0 - grout) + grout_lum * grout
    lum *= rng.uniform(0.92, 1.08)
    tint = 1.0 + rng.normal(0.0, 0.012, 3)
    rgb = lum[:, :, None] * (_BASE_COLOR * tint)[None, None, :]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- defects


def _draw_mask(size: int, draw_fn) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 127


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 40) -> list[tuple]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    return [(float(x), float(y)) for x, y in pts]


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    length = rng.uniform(0.25, 0.55) * s
    angle = rng.uniform(0, math.pi)
    start = rng.uniform(0.15 * s, 0.85 * s, 2)
    end = np.clip(start + length * np.array([math.cos(angle), math.sin(angle)]), 4, s - 5)
    bend = (start + end) / 2 + rng.normal(0, 0.08 * s, 2)
    width = max(2, round(s / 128 * rng.uniform(1.0, 1.6)))
    pts = _bezier(start, bend, end)
    mask = _draw_mask(s, lambda d: d.line(pts, fill=255, width=width, joint="curve"))
    strength = rng.uniform(0.4, 0.55) * (0.85 + 0.15 * rng.random(img.shape[:2]))
    out = img + (255.0 - img) * strength[:, :, None]
    return out, mask


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    radius = rng.uniform(0.02, 0.045) * s
    rim = max(1.5, 0.35 * radius)
    cy, cx = rng.uniform(0.12 * s, 0.88 * s, 2)
    yy, xx = np.mgrid[0:s, 0:s]
    dist = np.hypot(yy - cy, xx - cx)
    mask = dist <= radius + rim
    depth = np.clip(1.0 - dist / radius, 0.0, 1.0)  # 1 at the center, 0 at the edge
    dark = rng.uniform(0.3, 0.42) - 0.12 * depth
    out = img * dark[:, :, None]
    ring = mask & (dist > radius)
    out[ring] = np.minimum(img[ring] * 1.18 + 22.0, 250.0)
    return out, mask


_STAIN_COLORS = np.array([[128.0, 86.0, 44.0], [92.0, 74.0, 58.0], [150.0, 120.0, 60.0]])


def _stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    radius = rng.uniform(0.08, 0.13) * s
    cy, cx = rng.uniform(0.15 * s, 0.85 * s, 2)
    yy, xx = np.mgrid[0:s, 0:s]
    wobble = _unit(ndimage.gaussian_filter(rng.standard_normal((s, s)), 0.05 * s))
    stretch = rng.uniform(0.7, 1.3)
    dist = np.hypot((yy - cy) * stretch, (xx - cx) / stretch) / radius
    alpha = np.clip(1.0 - dist + 0.25 * wobble, 0.0, 1.0)
    threshold = 0.3
    mask = alpha > threshold
    t = np.clip((alpha - threshold) / (1.0 - threshold), 0.0, 1.0)
    strength = rng.uniform(0.45, 0.65) * (0.45 + 0.55 * t)
    color = _STAIN_COLORS[rng.integers(len(_STAIN_COLORS))]
    out = img * (1.0 - strength[:, :, None]) + color[None, None, :] * strength[:, :, None]
    return out, mask


def _crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    step = 0.03 * s
    n_steps = int(rng.integers(10, 18))
    pos = rng.uniform(0.2 * s, 0.8 * s, 2)
    heading = rng.uniform(0, 2 * math.pi)
    pts = [tuple(pos)]
    branch_at = int(rng.integers(3, n_steps - 2))
    branch: list[tuple] = []
    for i in range(n_steps):
        heading += rng.uniform(-0.35, 0.35)
        direction = np.array([math.cos(heading), math.sin(heading)])
        pos = np.clip(pos + step * direction, 2, s - 3)
        jag = rng.normal(0.0, 0.012 * s) * np.array([-direction[1], direction[0]])
        pts.append(tuple(np.clip(pos + jag, 2, s - 3)))
        if i == branch_at:
            branch = [tuple(pos)]
            bpos, bhead = pos.copy(), heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.1)
            for _ in range(int(rng.integers(2, 5))):
                bhead += rng.uniform(-0.5, 0.5)
                bpos = np.clip(bpos + step * np.array([math.cos(bhead), math.sin(bhead)]), 2, s - 3)
                branch.append(tuple(bpos))
    width = max(2, round(s / 128 * rng.uniform(0.9, 1.3)))

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.line([(float(x), float(y)) for x, y in pts], fill=255, width=width, joint="curve")
        d.line([(float(x), float(y)) for x, y in branch], fill=255, width=max(2, width - 1))

    mask = _draw_mask(s, draw)
    out = img * rng.uniform(0.3, 0.42)
    return out, mask


def _missing_piece(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    a, b = rng.uniform(0.12, 0.22, 2) * s
    corner = int(rng.integers(4))
    # Polygon in the top-left frame: the corner, a jagged break line from (a, 0) to (0, b).
    n = 7
    t = np.linspace(0.0, 1.0, n)
    bx, by = a * (1 - t), b * t
    jag = rng.normal(0.0, 0.025 * s, n)
    jag[[0, -1]] = 0.0
    norm = np.array([b, a]) / math.hypot(a, b)  # outward normal of the break line
    bx, by = bx + jag * norm[0], by + jag * norm[1]
    poly = [(-1.0, -1.0), *zip(bx.tolist(), by.tolist(), strict=True)]
    flip_x, flip_y = corner in (1, 2), corner in (2, 3)
    poly = [((s - 1 - x) if flip_x else x, (s - 1 - y) if flip_y else y) for x, y in poly]
    mask = _draw_mask(s, lambda d: d.polygon(poly, fill=255))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=1)
    noise = ndimage.gaussian_filter(rng.standard_normal((s, s)), 1.0) * 6.0
    under = np.array([52.0, 48.0, 45.0])[None, None, :] + noise[:, :, None]
    out = np.broadcast_to(under, img.shape).copy()
    out[edge] = np.minimum(img[edge] * 1.15 + 20.0, 250.0)
    return out, mask


_PAINTERS = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "missing_piece": _missing_piece,
}


def add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` into a copy of ``image``; returns ``(image, mask)``.

    Pixels outside the mask are unchanged; every pixel inside changes by at least
    ``MIN_DELTA`` in some channel (a weak spot is pushed further away from the original).
    """
    if kind not in _PAINTERS:
        raise VitqcError(f"unknown synthetic defect {kind!r}: choose {', '.join(DEFECT_TYPES)}")
    base = image.astype(np.float64)
    painted, mask = _PAINTERS[kind](base, rng)
    return push_weak_pixels(np.round(painted), image, mask), mask


def push_weak_pixels(painted: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``painted`` inside ``mask``, ``image`` outside, as uint8; a masked pixel that
    changed by less than ``MIN_DELTA`` grey levels is pushed that far from the original,
    so the mask is exactly the set of changed pixels."""
    new = np.clip(painted, 0, 255).astype(np.int16)
    old = image.astype(np.int16)
    weak = mask & (np.abs(new - old).max(axis=2) < MIN_DELTA)
    if weak.any():
        darker = old[weak].mean(axis=1, keepdims=True) >= 128
        new[weak] = np.where(darker, old[weak] - MIN_DELTA, old[weak] + MIN_DELTA)
    return np.where(mask[:, :, None], np.clip(new, 0, 255), old).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def generate_synthetic(
    out: str | Path,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defective: int = 30,
    size: int = 256,
    seed: int = 0,
    category: str = "tile",
) -> Path:
    """Write ``out/<category>/`` in the MVTec AD layout and return that category folder.

    Defect types take turns (``DEFECT_TYPES``), so 30 defective images give 6 of each.
    The category folder is built in a temporary folder and renamed into place: an
    interrupted run leaves no half-written dataset, and a rerun replaces it whole.
    """
    if size < 64:
        raise VitqcError(f"synthetic image size must be at least 64, got {size}")
    if n_train < 2:
        raise VitqcError(f"synthetic dataset needs at least 2 training images, got {n_train}")
    if n_test_good < 0 or n_test_defective < 0:
        raise VitqcError("synthetic test image counts must not be negative")
    material = make_material(size, seed)
    target = Path(out) / category
    with atomic_dir(target) as tmp:
        train_dir = tmp / "train" / "good"
        train_dir.mkdir(parents=True)
        for i in range(n_train):
            rng = np.random.default_rng([seed, 1, i])
            _save_png(make_surface(material, rng), train_dir / f"{i:03d}.png")
        good_dir = tmp / "test" / "good"
        good_dir.mkdir(parents=True)
        for i in range(n_test_good):
            rng = np.random.default_rng([seed, 2, i])
            _save_png(make_surface(material, rng), good_dir / f"{i:03d}.png")
        counters = dict.fromkeys(DEFECT_TYPES, 0)
        for i in range(n_test_defective):
            kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
            rng = np.random.default_rng([seed, 3, i])
            image, mask = add_defect(make_surface(material, rng), kind, rng)
            idx = counters[kind]
            counters[kind] += 1
            img_dir, mask_dir = tmp / "test" / kind, tmp / "ground_truth" / kind
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            _save_png(image, img_dir / f"{idx:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, mask_dir / f"{idx:03d}_mask.png")
    return target


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels in tens of KB: a
    decompression bomb for testing image-size limits (the service's ``--max-pixels``)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
