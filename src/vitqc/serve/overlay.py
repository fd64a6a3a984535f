"""``?map=true``: the heat-map overlay ``vitqc predict`` draws, as a base64 PNG.

The exported graph's map is on the operator scale of the stored threshold T (see
``vitqc.decision.operator_score``); inverting it gives u = (s - L) / (T - L) per pixel.
``vitqc predict`` colours (s - L) / (H - L) against (T - L) / (H - L) with
``report.figures.display_scale``, which depends on the ratio only, so colouring u
against 1 draws the same picture (against (T' - L) / (T - L) for a request's own
threshold T'). Map values below the typical normal pixel L are 0 on the operator scale,
which the colour scale clips anyway. The overlay keeps the image's aspect ratio with its
longer side at most ``MAX_SIDE`` pixels.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from vitqc.report.figures import anomaly_overlay, resize_to

__all__ = ["MAX_SIDE", "overlay_png_base64"]

MAX_SIDE = 1024


def overlay_png_base64(
    image: np.ndarray,
    operator_map: np.ndarray,
    map_low: float,
    stored_threshold: float,
    threshold: float,
) -> str:
    """uint8 RGB image + the graph's map -> base64 PNG of the overlay at ``threshold``."""
    o = np.clip(np.asarray(operator_map, dtype=np.float64), 0.0, 1.0 - 1e-7)
    u = np.where(o <= 0.5, 2.0 * o, 0.5 / (1.0 - o))
    t = (float(threshold) - map_low) / (stored_threshold - map_low)
    h, w = image.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    u = resize_to(u.astype(np.float32), image.shape[:2])
    buf = io.BytesIO()
    Image.fromarray(anomaly_overlay(image, u, t)).save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")
