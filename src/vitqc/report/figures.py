"""Pictures people would rather look at than numbers: overlays and evaluation panels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from vitqc.atomic import atomic_path  # noqa: E402

#: Factors of ten above the threshold that the overlay's colour scale spans.
DISPLAY_DECADES = 5.0


def resize_to(map_: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``shape`` (H, W)."""
    if map_.shape == tuple(shape):
        return map_
    img = Image.fromarray(map_.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR))


def display_scale(
    normalized: np.ndarray, threshold: float, decades: float = DISPLAY_DECADES
) -> np.ndarray:
    """Calibrated map values -> [0, 1] colours that keep a defect's shape readable.

    Linear from the typical good pixel (0) to the threshold (0.5); above it logarithmic,
    ``0.5 + 0.5 * log10(1 + excess / threshold) / decades``, so each factor of ten above
    the threshold gets the same share of the colour scale (2x -> 0.53, 10x -> 0.60,
    1000x -> 0.80) and only ``10 ** decades`` times the threshold saturates. A defect
    scoring far above the threshold still shows its own high and low parts, and the same
    function serves every image, so a colour means the same score everywhere.
    """
    x = np.asarray(normalized, dtype=np.float64)
    t = max(float(threshold), 1e-12)
    below = 0.5 * np.clip(x / t, 0.0, 1.0)
    above = 0.5 + 0.5 * np.log10(1.0 + np.maximum(x - t, 0.0) / t) / decades
    return np.where(x > t, np.minimum(above, 1.0), below)


def threshold_contour(normalized: np.ndarray, threshold: float) -> np.ndarray:
    """Bool ``[H, W]``: the one-pixel outline of the regions above the threshold."""
    above = np.asarray(normalized) > threshold
    return above & ~ndimage.binary_erosion(above, border_value=0)


def heat_overlay(
    image: np.ndarray, map01: np.ndarray, alpha: float = 0.5, contour: np.ndarray | None = None
) -> np.ndarray:
    """Blend a [0, 1] anomaly map (jet colours) onto an RGB uint8 image; ``contour``
    pixels (e.g. ``threshold_contour``) are drawn in white on top."""
    heat = plt.get_cmap("jet")(np.clip(map01, 0, 1))[..., :3]
    out = (1 - alpha) * image.astype(np.float32) / 255 + alpha * heat
    if contour is not None:
        out[contour] = 1.0
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def anomaly_overlay(image: np.ndarray, normalized: np.ndarray, threshold: float) -> np.ndarray:
    """What a person looks at: the display-scaled map with the threshold's outline."""
    return heat_overlay(
        image,
        display_scale(normalized, threshold),
        contour=threshold_contour(normalized, threshold),
    )


def save_png(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _save_figure(fig: plt.Figure, title: str, path: str | Path) -> None:
    """Title ``fig``, write it as a PNG (temp file, then rename) and free it."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def save_evaluation_panel(
    path: str | Path,
    image: np.ndarray,
    mask: np.ndarray | None,
    map01: np.ndarray,
    threshold01: float,
    title: str,
) -> None:
    """Image | ground truth | anomaly map | thresholded map, as one PNG. ``map01`` is the
    calibrated map and ``threshold01`` the threshold in the same units."""
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    axes[0].imshow(image)
    axes[0].set_title("image")
    if mask is None:
        axes[1].text(0.5, 0.5, "no mask", ha="center", va="center")
    else:
        axes[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth")
    axes[2].imshow(anomaly_overlay(image, map01, threshold01))
    axes[2].set_title("anomaly map (outline: threshold)")
    axes[3].imshow(image)
    axes[3].imshow(np.ma.masked_where(map01 < threshold01, map01), cmap="autumn", alpha=0.6)
    axes[3].set_title("above threshold")
    for ax in axes:
        ax.axis("off")
    _save_figure(fig, title, path)


def save_lookalike_panel(
    path: str | Path,
    test_image: np.ndarray,
    mask: np.ndarray | None,
    train_image: np.ndarray,
    title: str,
) -> None:
    """A defective test image beside the good training image that looks like it, as one
    PNG, for a person to judge whether the training picture shows the defect too. The
    mask's outline is drawn on both (scaled to the training image's size: where to look,
    as far as the two pictures are framed alike)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, image, label in (
        (axes[0], test_image, "defective test image (outline: its mask)"),
        (axes[1], train_image, "good training image (the same outline)"),
    ):
        shown = image.copy()
        if mask is not None and mask.any():
            outline = resize_to(mask.astype(np.float32), image.shape[:2]) > 0.5
            outline = ndimage.binary_dilation(outline & ~ndimage.binary_erosion(outline))
            shown[outline] = (255, 0, 0)
        ax.imshow(shown)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    _save_figure(fig, title, path)
