"""Uploaded bytes to pixels, refusing what would hurt the server before decoding it.

``probe`` reads only the header (Pillow opens lazily): an unknown format is refused (415)
and a pixel count above the limit (413) before a single pixel is decoded, so a
decompression bomb costs a few kilobytes of memory. ``decode`` then loads the pixels
through ``vitqc.data.io.image_array`` (what ``read_image`` does for files); a truncated
or corrupt file is refused (422). Only the formats ``vitqc predict`` reads from folders
are opened (no EPS, which Pillow hands to Ghostscript).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitqc.data.io import WHITE_LEVEL, UnsupportedImage, image_array

__all__ = ["FORMATS", "ImageRejected", "ImageHeader", "decode", "probe"]

FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")

# the service checks sizes itself, against its own limit (Pillow's warning would be noise)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejected(Exception):
    """An upload the service refuses: ``status`` (413, 415, 422) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
        raise ImageRejected(
            413, f"{name}: image above the pixel limit of {max_pixels} ({_first_line(exc)})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(
            415, f"{name}: not an image in a supported format ({', '.join(FORMATS)})"
        ) from exc
    except Exception as exc:  # a header Pillow cannot parse: as good as no image
        raise ImageRejected(415, f"{name}: unreadable image header ({_first_line(exc)})") from exc
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise ImageRejected(422, f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        img.close()
        raise ImageRejected(
            413,
            f"{name}: {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (--max-pixels)",
        )
    return img


def probe(data: bytes, name: str, max_pixels: int) -> ImageHeader:
    """The header's size and format, or ``ImageRejected``; no pixel is decoded."""
    with _open(data, name, max_pixels) as img:
        return ImageHeader(int(img.size[0]), int(img.size[1]), str(img.format))


def decode(data: bytes, name: str, max_pixels: int, white_level: int = WHITE_LEVEL) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` (size checked from the header first; ``white_level``:
    ``image_array``'s), or ``ImageRejected``."""
    with _open(data, name, max_pixels) as img:
        try:
            return image_array(img, white_level)
        except UnsupportedImage as exc:
            raise ImageRejected(415, f"{name}: {exc}") from exc
        except MemoryError as exc:
            raise ImageRejected(413, f"{name}: too large to decode") from exc
        except Exception as exc:  # truncated data, broken streams: Pillow's many types
            raise ImageRejected(
                422, f"{name}: cannot decode the image ({_first_line(exc)})"
            ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
