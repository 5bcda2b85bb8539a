"""Image I/O and the reference's PIL bicubic resize, as small pure functions.

Layout everywhere: HWC numpy arrays. ``uint8`` images hold 0..255; float images hold
[0, 1] unless a docstring says "normalised", which means (x - 0.5) / 0.5 in [-1, 1].
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from srno_jax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the files directly in `folder` with an image extension (any case)."""
    folder = os.fspath(folder)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Converts any PIL image to an (H, W, 3) uint8 RGB array.

    Grayscale, palette and RGBA images become RGB (alpha is dropped); 16-bit and 32-bit
    integer images are scaled from their full range to 0..255 with rounding; float
    images ('F') are taken as [0, 1].
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) <= 65535 else a.max()
        a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode == "F":
        a = np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"))


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as (H, W, 3) uint8 RGB (see `to_rgb_uint8`).

    Raises `DataError` naming the file when it is missing, truncated or not an image.
    """
    return to_rgb_uint8(open_image(path))


def open_image(path: str | os.PathLike) -> Image.Image:
    """Reads an image file as a loaded PIL image in its own mode (alpha, 16-bit kept).

    Raises `DataError` naming the file when it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
        raise DataError(f"cannot read image {path}: {e}; is it a complete image file?") from None


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Writes a uint8 (H, W), (H, W, 2|3|4) array (L, LA, RGB, RGBA) as an 8-bit PNG.

    Raises `DataError` naming the file when it cannot be written.
    """
    try:
        Image.fromarray(np.asarray(img, np.uint8)).save(path, format="PNG")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot write {path}: {e}") from None


def resize_bicubic(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of an (H, W, 3) uint8 image to size = (height, width), uint8.

    This is the reference's degradation (torchvision ``Resize(size, BICUBIC)`` on a PIL
    image), including PIL's antialiasing filter support when downsampling.
    """
    h, w = size
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def normalise(img: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 normalised (x / 255 - 0.5) / 0.5, in [-1, 1]."""
    return (img.astype(np.float32) / 255.0 - 0.5) / 0.5
