"""Pictures people would rather look at than numbers: overlays and evaluation panels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vitqc.atomic import atomic_path  # noqa: E402


def resize_to(map_: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``shape`` (H, W)."""
    if map_.shape == tuple(shape):
        return map_
    img = Image.fromarray(map_.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR))


def heat_overlay(image: np.ndarray, map01: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] anomaly map (jet colours) onto an RGB uint8 image."""
    heat = plt.get_cmap("jet")(np.clip(map01, 0, 1))[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255 + alpha * heat
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_evaluation_panel(
    path: str | Path,
    image: np.ndarray,
    mask: np.ndarray | None,
    map01: np.ndarray,
    threshold01: float,
    title: str,
) -> None:
    """Image | ground truth | anomaly map | thresholded map, as one PNG."""
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    axes[0].imshow(image)
    axes[0].set_title("image")
    if mask is None:
        axes[1].text(0.5, 0.5, "no mask", ha="center", va="center")
    else:
        axes[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    axes[2].imshow(heat_overlay(image, map01))
    axes[2].set_title("anomaly map")
    axes[3].imshow(image)
    axes[3].imshow(np.ma.masked_where(map01 < threshold01, map01), cmap="autumn", alpha=0.6)
    axes[3].set_title("above threshold")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
