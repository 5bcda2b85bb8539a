"""Image I/O and the reference's PIL bicubic resize, as small pure functions.

Layout everywhere: HWC numpy arrays. ``uint8`` images hold 0..255; float images hold
[0, 1] unless a docstring says "normalised", which means (x - 0.5) / 0.5 in [-1, 1].
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from srno_jax.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
WRITE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
DEFAULT_QUALITY = 95  # JPEG and WebP: an upscaler's output is about fine detail (PIL's own is 75)
ORIENTATION_TAG = 0x0112  # EXIF "Orientation": 1 is upright


def image_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the files directly in `folder` with an image extension (any case).

    `folder` may be local or a bucket (``gs://...``): it is listed through `etils.epath`.
    """
    return sorted(
        str(p)
        for p in epath.Path(folder).iterdir()
        if p.name.lower().endswith(IMAGE_EXTENSIONS) and p.is_file()
    )


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
    """Reads an image file as (H, W, 3) uint8 RGB (see `to_rgb_uint8`), as stored.

    The EXIF orientation is not applied: the pixels are read as the reference reads them.
    Raises `DataError` naming the file when it is missing, truncated, not an image or
    larger than PIL's pixel limit (see `open_image`).
    """
    return to_rgb_uint8(open_image(path))


def bomb_error(path, e: Exception) -> DataError:
    """The one-line refusal of a file whose header claims more pixels than PIL allows."""
    return DataError(
        f"refusing {path}: {e} If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS."
    )


def open_image(path: str | os.PathLike, *, orient: bool = False) -> Image.Image:
    """Reads an image file as a loaded PIL image in its own mode (alpha, 16-bit kept).

    With `orient`, the EXIF orientation is applied (`orient_image`), so a portrait phone
    photo comes out upright as viewers show it.
    Raises `DataError` naming the file when it is missing, truncated or not an image, and
    when its header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's guard
    against decompression bombs: its warning and its error both end here).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with contextlib.ExitStack() as files:
                local = "://" not in os.fspath(path)  # a bucket's file is read through epath
                src = path if local else files.enter_context(epath.Path(path).open("rb"))
                img = files.enter_context(Image.open(src))
                img.load()
                return orient_image(img) if orient else img
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bomb_error(path, e) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
        raise DataError(f"cannot read image {path}: {e}; is it a complete image file?") from None


def orient_image(img: Image.Image) -> Image.Image:
    """`img` turned upright by its EXIF orientation tag (PIL's ``ImageOps.exif_transpose``).

    Returns `img` itself when it has no orientation tag, else a transposed copy without it.
    """
    if img.getexif().get(ORIENTATION_TAG, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def output_format(path: str | os.PathLike) -> str:
    """PIL's format name for an output file, from its extension (any case).

    Raises `ConfigError` for an extension that `save_image` does not write.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in WRITE_FORMATS:
        raise ConfigError(
            f"cannot tell the output format of {os.fspath(path)!r} from its "
            f"extension; end the name with one of {', '.join(WRITE_FORMATS)}"
        )
    return WRITE_FORMATS[ext]


def save_image(path: str | os.PathLike, img: np.ndarray, quality: int | None = None) -> None:
    """Writes a uint8 (H, W), (H, W, 2|3|4) array (L, LA, RGB, RGBA) in the format of
    the file's extension (`output_format`): 8-bit PNG, JPEG, WebP, TIFF or BMP.

    JPEG and BMP have no alpha channel: LA is written as L and RGBA as RGB there.
    `quality` (1..100) sets JPEG and WebP quality; default `DEFAULT_QUALITY`; other formats
    are lossless and ignore it.
    The file appears complete or not at all (written beside it, then renamed).
    Raises `ConfigError` for an unknown extension, `DataError` naming the file when it
    cannot be written.
    """
    fmt = output_format(path)
    pil = Image.fromarray(np.asarray(img, np.uint8))
    if fmt in ("JPEG", "BMP") and pil.mode in ("LA", "RGBA"):
        pil = pil.convert(pil.mode[:-1])
    options = (
        {"quality": DEFAULT_QUALITY if quality is None else quality}
        if fmt in ("JPEG", "WEBP")
        else {}
    )
    # Written beside and renamed: an interrupted write never leaves half a file at `path`.
    folder, name = os.path.split(os.fspath(path))
    partial = os.path.join(folder, f".{name}.partial")
    try:
        pil.save(partial, format=fmt, **options)
        os.replace(partial, path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot write {path}: {e}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


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
