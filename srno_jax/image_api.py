"""The image-level API: `upscale` any image to any scale or size, and `super_resolve`.

Owns output sizes, image modes and their conversions; the numerics are
`inference.predict` (exact chunked prediction) and `metrics.eval_cell`.
"""

from __future__ import annotations

import math
import numbers
from decimal import Decimal
from fractions import Fraction

import numpy as np
from PIL import Image

from srno_jax.coords import make_coord
from srno_jax.errors import ConfigError, DataError
from srno_jax.images import fill_hidden, normalise, orient_image, to_rgb_uint8
from srno_jax.inference import DEFAULT_TILE, predict
from srno_jax.metrics import eval_cell
from srno_jax.models import check_variables

MAX_OUTPUT_PIXELS = 2**27  # e.g. 16384 x 8192; the float32 prediction alone takes 1.5 GiB
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")  # besides any mode with a "transparency" key
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N")


def super_resolve(
    model,
    variables,
    lr: np.ndarray,
    size: tuple[int, int],
    scale: float,
    chunk_size: int | None = None,
    tile: int = DEFAULT_TILE,
) -> np.ndarray:
    """The model's (H, W, 3) float image in [0, 1] of size = (H, W) from an LR uint8 RGB image.

    Queries the pixel centres of the whole output grid (`make_coord`) with cell
    `metrics.eval_cell(size, scale)` (enlarged beyond x4, the reference's "mcell") and
    returns clip(pred * 0.5 + 0.5, 0, 1), not quantised. Raises `ConfigError` when
    `variables` are not `model`'s (`models.check_variables`) or give a prediction that is
    not finite (clipping would turn it into a black image), `DataError` when `lr` is not a
    uint8 (h, w, 3) array.
    """
    check_variables(model, variables)
    lr = np.asarray(lr)
    if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3:
        raise DataError(
            f"lr must be a uint8 (h, w, 3) RGB array, got {lr.dtype} of shape {lr.shape}; "
            "upscale() converts other images"
        )
    pred = predict(
        model,
        variables,
        normalise(lr)[None],
        make_coord(size)[None],
        eval_cell(size, scale)[None],
        chunk_size,
        tile,
    )[0]
    if not np.isfinite(pred).all():
        raise ConfigError(
            "the model's prediction holds NaN or infinite values: its variables hold "
            "non-finite or diverged parameters (load_checkpoint refuses such files; check "
            "what changed the variables)"
        )
    return np.clip(pred * 0.5 + 0.5, 0, 1)


def _count(n: int) -> str:
    """An integer for a message: as it is up to 12 digits, else like 2.56e+402."""
    return str(n) if n < 10**12 else f"{Decimal(n):.3g}"


def _plain(x):
    """A NumPy or JAX scalar or 0-d array as the Python number it holds, another real
    number (a `Fraction`) as a float, and anything else as it is (for `output_size` to
    judge)."""
    if hasattr(x, "item") and np.ndim(x) == 0:
        x = x.item()
    if isinstance(x, numbers.Real) and not isinstance(x, (int, float)):
        x = float(x)
    return x


def output_size(hw: tuple[int, int], scale, size) -> tuple[int, int]:
    """(H, W) of the output for an input of hw = (h, w); see `upscale` for the rules.

    `scale` is a real number (Python's, NumPy's or a JAX scalar), `size` two integers (a
    tuple, list or 1-d integer array). Raises `ConfigError` for a bad scale or size or
    more than MAX_OUTPUT_PIXELS pixels. Its messages write sizes as WIDTHxHEIGHT, as
    `srno-upscale --size` and image editors do.
    """
    scale = _plain(scale)
    if hasattr(size, "shape") and np.ndim(size) == 1:
        size = np.asarray(size).tolist()
    if (scale is None) == (size is None):
        raise ConfigError("give exactly one of scale (e.g. 3.7) or size (height, width)")
    if scale is not None:
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale <= 1
        ):
            raise ConfigError(
                f"scale must be a finite number > 1 (SRNO enlarges; to shrink an "
                f"image use PIL's resize), got {scale!r}"
            )
        exact = (hw[0] * scale, hw[1] * scale)
        if not all(map(math.isfinite, exact)):  # e.g. scale 1e308: too large, said below
            exact = (Fraction(scale) * hw[0], Fraction(scale) * hw[1])
        out = (max(round(exact[0]), 1), max(round(exact[1]), 1))
        if out == tuple(hw):
            raise ConfigError(
                f"scale {scale:g} leaves the {hw[1]}x{hw[0]} (width x height) "
                f"input at {out[1]}x{out[0]} after rounding; give a larger scale"
            )
    else:
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
        ):
            raise ConfigError(f"size must be (height, width) integers, got {size!r}")
        out = (int(size[0]), int(size[1]))
        if out[0] < hw[0] or out[1] < hw[1] or out == tuple(hw):
            raise ConfigError(
                f"size {out[1]}x{out[0]} (width x height) does not enlarge the "
                f"{hw[1]}x{hw[0]} input; SRNO only enlarges: give a larger size"
            )
    if out[0] * out[1] > MAX_OUTPUT_PIXELS:
        raise ConfigError(
            f"output {_count(out[1])}x{_count(out[0])} (width x height) has "
            f"{_count(out[0] * out[1])} pixels, more than the limit {MAX_OUTPUT_PIXELS}; "
            "choose a smaller scale or size"
        )
    return out


def _as_pil(image) -> Image.Image:
    """A PIL image from a PIL image (turned upright by its EXIF orientation) or a
    uint8/uint16 numpy array (see `upscale`)."""
    if isinstance(image, Image.Image):
        if min(image.size) < 1:  # an empty crop
            raise DataError(f"the image is empty ({image.width}x{image.height} pixels)")
        return orient_image(image)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    ok = (a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)))) or (
        a.dtype == np.uint16 and a.ndim == 2
    )
    if not ok or min(a.shape[:2], default=0) < 1:
        raise DataError(
            f"expected a PIL image, a uint8 (H, W[, 1|3|4]) array or a uint16 "
            f"(H, W) array, got {a.dtype} of shape {a.shape}"
        )
    return Image.fromarray(a)


def upscale(
    model,
    variables,
    image,
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    chunk_size: int | None = None,
    tile: int = DEFAULT_TILE,
) -> np.ndarray:
    """Resizes an image with SRNO to any scale or size, exactly and in bounded memory.

    Args:
      model, variables: an SRNO and its ``{'params': ...}`` (e.g. from `load_checkpoint`).
      image: a PIL image of any mode, or a numpy array: uint8 (H, W), (H, W, 1),
        (H, W, 3) RGB or (H, W, 4) RGBA, or uint16 (H, W). Converted to RGB by
        `images.to_rgb_uint8` (16-bit values are scaled to 0..255; 32-bit modes 'I' and
        'F' are refused, their range being unknown). A PIL image is first
        turned upright by its EXIF orientation tag (`images.orient_image`), so H and W
        are those of the upright image.
      scale: output = (round(H * scale), round(W * scale)); any finite float > 1, not
        only integers, that changes the size.
      size: explicit output (height, width) instead of scale, no side smaller than the
        input's and not equal to it.
      chunk_size, tile: see `predict`.
    Returns:
      uint8 array: (H', W', 3) for colour input; (H', W') for grayscale input
      (`GRAYSCALE_MODES`: 1-bit, 8-bit and 16-bit; the RGB output converted to PIL 'L',
      ITU-R 601-2 luma); with a 4th (colour) or 2nd (grayscale) channel for input with
      alpha (`ALPHA_MODES`, or a "transparency" key as in a palette image with a
      transparent colour or a 16-bit grayscale PNG with a transparent value), that alpha
      resized with PIL bicubic; fully transparent pixels are first given the colour of
      the nearest visible one (`images.fill_hidden`), so that the colour hidden there
      does not bleed into visible edges.
      Colour = round(clip(pred * 0.5 + 0.5, 0, 1) * 255), where the model queries the
      output grid's pixel centres with cell = (2 / H', 2 / W') * max(s / 4, 1) and s the
      larger of the two axis scales (`metrics.eval_cell`, the reference's "mcell").
      The values are in the input's colour space: to keep its colour profile, pass
      ``image.info.get('icc_profile')`` to the save (PIL's or `images.save_image`).
    Raises:
      ConfigError for a bad scale/size, DataError for a bad image (both before any work).
    """
    pil = _as_pil(image)
    out_h, out_w = output_size((pil.height, pil.width), scale, size)
    rgb = to_rgb_uint8(pil)
    alpha = _alpha(pil)
    if alpha is not None:
        rgb = fill_hidden(rgb, np.asarray(alpha))
    s = max(out_h / pil.height, out_w / pil.width)
    out = np.round(
        super_resolve(model, variables, rgb, (out_h, out_w), s, chunk_size, tile) * 255
    ).astype(np.uint8)
    if pil.mode in GRAYSCALE_MODES:
        out = np.asarray(Image.fromarray(out).convert("L"))
    if alpha is not None:
        alpha = alpha.resize((out_w, out_h), Image.BICUBIC)
        out = np.dstack([out, np.asarray(alpha)])
    return out


def _alpha(pil: Image.Image) -> Image.Image | None:
    """The alpha of `pil` as an 'L' image, or None for an opaque one (see `upscale`)."""
    if pil.mode in ALPHA_MODES:
        return pil.split()[-1]  # "A", or "a" in the premultiplied modes
    if "transparency" not in pil.info:
        return None
    if pil.mode.startswith("I"):
        # 16-bit (and 'I') grayscale: PIL's RGBA conversion ignores the key, so keyed
        # pixels would come out opaque.
        keyed = np.asarray(pil) == pil.info["transparency"]
        return Image.fromarray(np.where(keyed, 0, 255).astype(np.uint8))
    return pil.convert("RGBA").split()[-1]
