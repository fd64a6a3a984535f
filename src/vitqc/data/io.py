"""Reading images and masks from disk with one-line errors for bad files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitqc.data.records import Sample
from vitqc.errors import VitqcError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a visible file with an image extension (case-insensitive)."""
    suffix_ok = path.suffix.lower() in IMAGE_EXTENSIONS
    return suffix_ok and not path.name.startswith(".") and path.is_file()


#: The pixel value an image of more than 8 bits is read as white by default (8-bit data).
WHITE_LEVEL = 255
#: Bits per pixel a model can read images of (``--bit-depth``): 8 to 16.
BIT_DEPTHS = range(8, 17)


def white_level_for(bit_depth: int) -> int:
    """The value read as white in images of ``bit_depth`` bits (a 12-bit camera: 4095)."""
    if bit_depth not in BIT_DEPTHS:
        raise VitqcError(
            f"--bit-depth must be 8 to 16 (the camera's bits per pixel), got {bit_depth}"
        )
    return 2**bit_depth - 1


#: Pillow modes of more than 8 bits per pixel besides the 16-bit ``I;16*`` ones (32-bit
#: integer and float): Pillow's conversion to RGB clips their values at 255.
_WIDE_MODES = ("I", "F")


class UnsupportedImage(ValueError):
    """Pixels that cannot be brought to 8 bits without losing what they show."""


#: EXIF orientations that turn the picture by 90 degrees (width and height swap).
_QUARTER_TURNS = (5, 6, 7, 8)


def _orientation(img: Image.Image) -> int | None:
    """The image's EXIF orientation tag; None without one, or where the EXIF block is
    corrupt (Pillow's parser raises several types on bad data): the picture is then read
    as stored, as before orientations were applied."""
    try:
        return img.getexif().get(0x0112)
    except Exception:
        return None


def _upright(img: Image.Image) -> None:
    """Turn ``img`` in place as its EXIF orientation says."""
    if _orientation(img) not in (None, 1):
        ImageOps.exif_transpose(img, in_place=True)


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as ``image_array`` returns it (its EXIF
    orientation applied), from the header alone."""
    width, height = img.size
    turned = _orientation(img) in _QUARTER_TURNS
    return (height, width) if turned else (width, height)


def read_image(path: str | Path, white_level: int = WHITE_LEVEL) -> np.ndarray:
    """Read an image file as uint8 RGB ``[H, W, 3]``; grayscale becomes 3 identical channels
    (``white_level``: ``image_array``'s)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return image_array(img, white_level)
    except UnsupportedImage as exc:
        raise VitqcError(f"cannot read image {path}: {exc}") from exc
    except FileNotFoundError as exc:
        raise VitqcError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VitqcError(f"cannot read image {path}: not a valid image file") from exc


def image_array(img: Image.Image, white_level: int = WHITE_LEVEL) -> np.ndarray:
    """An opened Pillow image decoded as uint8 RGB ``[H, W, 3]`` (grayscale and palette
    images converted by Pillow): what ``read_image`` returns, also for images that were
    not read from a file (the service's uploads).

    Grayscale images of 16 or 32 bits (machine-vision cameras' Mono12 / Mono16 saved as
    PNG or TIFF) are scaled so that ``white_level`` (the model's, ``2 ** bit_depth - 1``)
    reads as 255; a value above it is refused (``UnsupportedImage``), as Pillow would clip
    it and no scale chosen per image keeps brightness comparable between images.
    Floating-point ones are taken when every value is within [0, 1] (times 255). 8-bit
    images are read as they are. An EXIF orientation (a phone or camera held on its side)
    is applied, so the pixels are the picture every viewer shows, and its masks are drawn
    on."""
    img.load()
    _upright(img)
    if img.mode in _WIDE_MODES or img.mode.startswith("I;16"):
        pixels = np.asarray(img)
        low, high = pixels.min(), pixels.max()  # one pass each over a full-size image
        floating = pixels.dtype.kind == "f"
        if floating and low >= 0 and high <= 1:
            pixels = np.rint(pixels * 255)
        elif floating:
            raise UnsupportedImage(
                f"floating-point pixels ranging {low:g} to {high:g}: vitqc takes them within [0, 1]"
            )
        elif low < 0 or high > white_level:
            bits = int(high).bit_length() if low >= 0 else 32
            raise UnsupportedImage(
                f"{img.mode} grayscale pixels ranging {low:g} to {high:g}, "
                f"above the white level {white_level} (--bit-depth "
                f"{white_level.bit_length()}): they need --bit-depth {max(bits, 9)} or more "
                "(the camera's bits per pixel, given to vitqc fit)"
            )
        else:
            pixels = np.rint(pixels * (255 / white_level))
        img = Image.fromarray(pixels.astype(np.uint8))
    rgb = img.convert("RGB")
    return np.array(rgb, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool ``[H, W]``: pixels > 127 are defect, or pixels of
    1 in a mask of only 0 and 1 (a common export, which the 127 rule read as empty)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            _upright(img)
            gray = np.asarray(img.convert("L"))
    except FileNotFoundError as exc:
        raise VitqcError(f"mask not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VitqcError(f"cannot read mask {path}: not a valid image file") from exc
    return gray > (127 if gray.max(initial=0) > 1 else 0)


def load_image(sample: Sample, white_level: int = WHITE_LEVEL) -> np.ndarray:
    """The sample's pixels as uint8 RGB ``[H, W, 3]`` (``white_level``: ``image_array``'s)."""
    if sample.array is not None:
        arr = np.asarray(sample.array, dtype=np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return arr
    if sample.path is None:
        raise VitqcError(f"sample {sample.key} has neither a path nor pixels")
    return read_image(sample.path, white_level)


def load_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """Ground truth at the image's original resolution.

    Good images get an all-zero mask of ``shape``; a defective image without a mask
    file returns None (its pixels are left out of pixel metrics). A mask whose size
    differs from its image is an error naming the file.
    """
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool) if sample.label == 0 else None
    mask = read_mask(sample.mask_path)
    if mask.shape != tuple(shape):
        raise VitqcError(
            f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{shape[1]}x{shape[0]}"
        )
    return mask


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if is_image_file(p))
            if not found:
                raise VitqcError(f"no images found in folder {item}")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise VitqcError(f"input not found: {item}")
    return files
