"""Image I/O and the reference's PIL bicubic resize, as small pure functions.

Layout everywhere: HWC numpy arrays. ``uint8`` images hold 0..255; float images hold
[0, 1] unless a docstring says "normalised", which means (x - 0.5) / 0.5 in [-1, 1].
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from srno_jax.errors import ConfigError, DataError
from srno_jax.workdir import is_uri

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
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}  # libjpeg's and libwebp's largest width or height
ICC_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF")  # those of WRITE_FORMATS that hold an ICC profile
ICC_SPACES = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "LA": b"GRAY"}
UNSUPPORTED_MODES = {"I": "32-bit integer", "F": "32-bit float"}
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
BOMB_FIX = "raise PIL.Image.MAX_IMAGE_PIXELS"


def image_files(folder: str | os.PathLike) -> list[str]:
    """Sorted paths of the files directly in `folder` with an image extension (any case),
    leaving out macOS's ``._NAME`` files (AppleDouble metadata that copies from a Mac
    leave beside each file; never images).

    `folder` may be local or a bucket (``gs://...``): it is listed through `etils.epath`.
    """
    return sorted(
        str(p)
        for p in epath.Path(folder).iterdir()
        if p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.startswith("._") and p.is_file()
    )


def _png_16_bit(img: Image.Image) -> bool:
    """A 16-bit grayscale PNG as older Pillow versions open it: mode 'I' (a PNG holds
    no 32-bit samples)."""
    return img.mode == "I" and img.format == "PNG"


def check_mode(img: Image.Image, source: str = "the image") -> None:
    """Refuses 32-bit images (modes 'I' and 'F'): their values have no fixed range that
    maps to 0..255 (0..1, 0..255 and 0..65535 are all common), so any guess gives some
    files a wrong image. Raises `DataError` naming `source` and the fix."""
    if img.mode in UNSUPPORTED_MODES and not _png_16_bit(img):
        raise DataError(
            f"{source} is a {UNSUPPORTED_MODES[img.mode]} image (mode {img.mode!r}), "
            "whose value range is unknown; convert it to 8-bit or 16-bit first"
        )


def to_rgb_uint8(img: Image.Image, source: str = "the image") -> np.ndarray:
    """Converts a PIL image to an (H, W, 3) uint8 RGB array.

    Grayscale, palette and RGBA images become RGB (alpha is dropped); 16-bit images
    ('I;16*') are scaled from 0..65535 to 0..255 with rounding. 32-bit images ('I', 'F')
    are refused (`check_mode`; `source` names the image there).
    """
    check_mode(img, source)
    if img.mode.startswith("I;16") or _png_16_bit(img):
        a = np.round(np.asarray(img).astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    # Premultiplied alpha: PIL converts it to RGB only through its straight form.
    if img.mode in PREMULTIPLIED:
        img = img.convert(PREMULTIPLIED[img.mode])
    return np.asarray(img.convert("RGB"))


def fill_hidden(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`rgb` (H, W, 3) with each fully transparent pixel (`alpha` (H, W) == 0) given the
    colour of the nearest visible pixel (Euclidean; ties as scipy's distance transform
    breaks them).

    The colour under transparency is arbitrary, often black; an upscaler that sees it
    bleeds it into the visible edge (a dark fringe round a logo). Visible pixels, and
    images with no or only transparent pixels, are returned unchanged.
    """
    hidden = alpha == 0
    if not hidden.any() or hidden.all():
        return rgb
    from scipy import ndimage

    rows, cols = ndimage.distance_transform_edt(hidden, return_distances=False, return_indices=True)
    return rgb[rows, cols]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as (H, W, 3) uint8 RGB (see `to_rgb_uint8`), as stored.

    The EXIF orientation is not applied: the pixels are read as the reference reads them.
    Raises `DataError` naming the file when it is missing, truncated, not an image,
    32-bit (`check_mode`) or larger than PIL's pixel limit (see `open_image`).
    """
    return to_rgb_uint8(open_image(path), os.fspath(path))


def bomb_error(path, e: Exception, fix: str = BOMB_FIX) -> DataError:
    """The one-line refusal of a file whose header claims more pixels than PIL allows;
    `fix` says how to raise that limit. PIL's own message is not repeated: past twice the
    limit it names twice the limit."""
    claimed = re.search(r"\((\d+) pixels\)", str(e))
    what = f"its header claims {int(claimed[1]):,} pixels" if claimed else str(e)
    return DataError(
        f"refusing {path}: {what}, more than PIL's limit of {Image.MAX_IMAGE_PIXELS:,} "
        f"(a guard against decompression bombs). If you trust the file, {fix}."
    )


def open_image(
    path: str | os.PathLike,
    *,
    orient: bool = False,
    bomb_fix: str = BOMB_FIX,
    one_frame: bool = False,
) -> Image.Image:
    """Reads an image file as a loaded PIL image in its own mode (alpha, 16-bit kept).

    With `orient`, the EXIF orientation is applied (`orient_image`), so a portrait phone
    photo comes out upright as viewers show it. With `one_frame`, an animated or
    multi-page file (a GIF, WebP, APNG or TIFF of several frames) is refused, as only its
    first frame would be read; an MPO (a camera JPEG with extra views or a depth map)
    reads as its primary image.
    Raises `DataError` naming the file when it is missing, truncated or not an image, and
    when its header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's guard
    against decompression bombs: its warning and its error both end here); `bomb_fix`
    replaces that message's advice on raising the limit (`bomb_error`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A camera's damaged EXIF: read as stored (no orientation), as viewers show it.
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)
            with contextlib.ExitStack() as files:
                # A bucket's file is read through epath.
                src = files.enter_context(epath.Path(path).open("rb")) if is_uri(path) else path
                img = files.enter_context(Image.open(src))
                # Before load: counting frames seeks through them, dropping loaded pixels.
                frames = getattr(img, "n_frames", 1) if img.format != "MPO" else 1
                img.load()
                img = orient_image(img) if orient else img
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bomb_error(path, e, bomb_fix) from None
    except Exception as e:  # PIL's errors for corrupt files: OSError, TypeError, ...
        raise DataError(
            f"cannot read image {path}: {type(e).__name__}: {e}; is it a complete image file?"
        ) from None
    if one_frame and frames > 1:
        raise DataError(
            f"{path} is animated or multi-page ({frames} frames), and only the first would "
            "be used; save the frame you want as an image of its own and give that"
        )
    return img


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


def check_savable(path: str | os.PathLike, hw: tuple[int, int]) -> str:
    """PIL's format name for writing an image of hw = (height, width) to `path`
    (`output_format`), refusing what `save_image` would fail on only after the work:
    a side over the format's limit (`MAX_SIDE`) and a file name too long for its folder.

    Raises `ConfigError` naming the path and the fix.
    """
    fmt = output_format(path)
    if max(hw) > MAX_SIDE.get(fmt, max(hw)):
        raise ConfigError(
            f"output {os.fspath(path)} would be {hw[1]}x{hw[0]}, but {fmt} images are at "
            f"most {MAX_SIDE[fmt]} pixels a side; write .png or .tif, or a smaller size"
        )
    folder, name = os.path.split(os.fspath(path))
    try:
        name_max = os.pathconf(folder or ".", "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no folder yet
        name_max = 255
    # save_image writes ".NAME.partial" beside the output first, so that name must fit too.
    room = name_max - len("..partial")
    if len(os.fsencode(name)) > room:
        raise ConfigError(
            f"output file name {name!r} is {len(os.fsencode(name))} bytes; it can have "
            f"at most {room} here; choose a shorter name"
        )
    return fmt


def icc_profile_for(profile: bytes | None, mode: str) -> bytes | None:
    """`profile` (an ICC profile's bytes, or None) if it describes an image of `mode`,
    else None.

    A profile names the colours it describes in its header (bytes 16..20): 'RGB ' fits
    RGB and RGBA, 'GRAY' fits L and LA (`ICC_SPACES`). Any other pairing, such as a CMYK
    input's profile on its RGB output, would make viewers misread every pixel.
    """
    if profile and profile[16:20] == ICC_SPACES.get(mode):
        return profile
    return None


def save_image(
    path: str | os.PathLike,
    img: np.ndarray,
    quality: int | None = None,
    icc_profile: bytes | None = None,
    replace: bool = True,
) -> None:
    """Writes a uint8 (H, W), (H, W, 1|2|3|4) array (L, L, LA, RGB, RGBA) in the format of
    the file's extension (`output_format`): 8-bit PNG, JPEG, WebP, TIFF or BMP.

    JPEG and BMP have no alpha channel: LA is written as L and RGBA as RGB there. WebP
    has no grayscale: L is written as RGB and LA as RGBA there (R = G = B).
    `quality` (1..100) sets JPEG and WebP quality; default `DEFAULT_QUALITY`; other formats
    are lossless and ignore it.
    `icc_profile` (e.g. the input's ``info['icc_profile']``, such as Display-P3) is
    embedded in PNG, JPEG, WebP and TIFF (`ICC_FORMATS`) when it fits the mode written
    (`icc_profile_for`); otherwise, and in BMP, the file has none (viewers assume sRGB).
    The file appears complete or not at all (written beside it, then renamed).
    With `replace` False an existing file at `path` is kept, including one that another
    program creates while this one writes (the rename is then a hard link, which fails
    if the name is taken).
    Raises `ConfigError` for another dtype than uint8 or shape, and for what
    `check_savable` refuses, `DataError` naming the file when it cannot be written or
    exists with `replace` False.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:  # a cast would wrap 16-bit values and floor [0, 1] floats to 0
        raise ConfigError(
            f"save_image takes a uint8 image, got {img.dtype}; convert a float image in "
            "[0, 1] (super_resolve's) with np.round(img * 255).astype(np.uint8)"
        )
    if not (img.ndim == 2 or (img.ndim == 3 and 1 <= img.shape[2] <= 4)) or 0 in img.shape:
        raise ConfigError(
            f"save_image takes an (H, W) or (H, W, 1|2|3|4) image, got shape {img.shape}"
        )
    fmt = check_savable(path, img.shape[:2])
    pil = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    if fmt in ("JPEG", "BMP") and pil.mode in ("LA", "RGBA"):
        pil = pil.convert(pil.mode[:-1])
    if fmt == "WEBP" and pil.mode in ("L", "LA"):  # as PIL writes it: a gray profile won't fit
        pil = pil.convert("RGB" + pil.mode[1:])
    options = (
        {"quality": DEFAULT_QUALITY if quality is None else quality}
        if fmt in ("JPEG", "WEBP")
        else {}
    )
    icc_profile = icc_profile_for(icc_profile, pil.mode)
    if icc_profile and fmt in ICC_FORMATS:
        options["icc_profile"] = icc_profile
    # Written beside and renamed: an interrupted write never leaves half a file at `path`.
    folder, name = os.path.split(os.fspath(path))
    partial = os.path.join(folder, f".{name}.partial")
    try:
        pil.save(partial, format=fmt, **options)
        if replace:
            os.replace(partial, path)
        else:
            _move_to_new_name(partial, path)
    except FileExistsError:
        raise DataError(
            f"not replacing {path}: it exists (made while this image was computed)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot write {path}: {e}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _move_to_new_name(src: str, dst: str | os.PathLike) -> None:
    """Renames `src` to `dst` unless `dst` exists (FileExistsError), atomically where the
    filesystem has hard links; without them (FAT, some network mounts) check, then rename."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(dst) from None
        os.replace(src, dst)


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
