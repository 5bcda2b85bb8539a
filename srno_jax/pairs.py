"""Paired low- and high-resolution images: discovery, the scale of each pair, loading.

Two folder layouts are paired (``find_pairs``):

    root/HR/0001.png  root/LR/0001.png             matched by file stem
    root/HR/0801.png  root/X2/0801x2.png  root/X4/0801x4.png   DIV2K: one folder per scale

An LR file matches the HR file whose stem is its own stem, or its own stem less a
trailing ``x<s>`` (``0801x2``, ``0801x2.5``; either case). Each pair has a fixed scale:
an ``X<s>`` folder's, or one read from the two images' sizes (``pair_scale``: a whole
number, as the reference's paired loader takes it, or an exact ratio of both sides). Folders may be local or in a bucket (``gs://...``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
from etils import epath
from PIL import Image

from srno_jax.errors import DataError
from srno_jax.images import ORIENTATION_TAG, bomb_error, image_files, load_image
from srno_jax.metrics import covered_grid, lr_side

_SCALE_DIR = re.compile(r"^[xX](\d+(?:\.\d+)?)$")  # X2, X3, x2.5
_SCALE_SUFFIX = re.compile(r"[xX]\d+(?:\.\d+)?$")  # the 'x2' of 0801x2


@dataclasses.dataclass(frozen=True)
class Pair:
    """One LR image and its HR image.

    ``name`` is unique within a folder: the HR stem, prefixed with ``<lr folder>/`` when
    the layout has several LR folders. ``scale`` (>= 1) is ``pair_scale`` of the sizes.
    """

    name: str
    hr_path: str
    lr_path: str
    scale: float


def _fits(hr_hw: tuple[int, int], lr_hw: tuple[int, int], s: float) -> bool:
    """Whether the LR sides are the HR sides / s by one rule on both axes: floored (an HR
    image cropped to a multiple of s before it was downsampled, as benchmark LR sets are
    made), rounded half to even (Python, numpy), rounded half up, or rounded up
    (MATLAB's imresize)."""
    rules = (
        lambda x: lr_side(x, s),
        lambda x: round(x / s),
        lambda x: math.floor(x / s + 0.5),
        lambda x: math.ceil(x / s - 1e-9),
    )
    return any(all(lr == rule(hr) for hr, lr in zip(hr_hw, lr_hw)) for rule in rules)


def pair_scale(
    hr_hw: tuple[int, int], lr_hw: tuple[int, int], names: str = "", nominal: float | None = None
) -> float:
    """The scale s >= 1 that maps the LR size onto the HR size.

    s is `nominal` (an ``X<s>`` folder's scale) where given, else the whole number
    H // h or round(H / h) when it fits, else H / h when that equals W / w exactly (the
    HR image is the LR image's size times s on both axes). It fits (`_fits`) when the LR
    sides are the HR sides / s by one rule, floored, rounded or rounded up: a 321 x 481
    HR image with its 80 x 120 LR is x4, as the reference's paired loader takes it, not
    x4.008. Other non-integer scales are not read from the sizes, because a range of
    them fits: a 50 x 60 HR image with a 13 x 16 LR is x3.7 (floored sides) as well as
    x3.75 (60 / 16), and the two crop and align the HR image differently. The HR grid
    the LR covers is `metrics.covered_grid`, which can exceed H x W by the rows and
    columns of rounding up (`pair_images` keeps the rows that exist).

    Args:
      hr_hw, lr_hw: (height, width) of the HR and LR images, in pixels.
      names: names the files in the error message.
      nominal: the scale the pair must have, if known.
    Raises:
      DataError: naming `names`, when the LR is larger than the HR on either axis, the
        sizes do not fit `nominal`, or (without `nominal`) they fit no scale or only
        non-integer scales other than an exact ratio.
    """
    (hh, hw), (lh, lw) = hr_hw, lr_hw
    what = f" ({names})" if names else ""
    if min(hh, hw, lh, lw) < 1:
        raise DataError(f"empty image in pair{what}: HR {hh}x{hw}, LR {lh}x{lw}")
    tight = min(hh / lh, hw / lw)
    if tight < 1:
        raise DataError(
            f"the LR image is larger than the HR image{what}: HR {hh}x{hw}, "
            f"LR {lh}x{lw} (H x W); are the two folders swapped?"
        )
    if nominal is not None:
        if _fits(hr_hw, lr_hw, nominal):
            return nominal
        raise DataError(
            f"the sizes{what} do not fit x{nominal:g}: HR {hh}x{hw}, LR {lh}x{lw} (H x W) "
            f"are x{tight:.4g} apart; move the LR image to the folder of its scale"
        )
    for whole in (hh // lh, round(hh / lh)):  # LR sides floored, or rounded up
        if _fits(hr_hw, lr_hw, whole):
            return float(whole)
    if hh * lw == hw * lh:
        return hh / lh
    if _fits(hr_hw, lr_hw, tight):
        raise DataError(
            f"the scale of{what} cannot be told from the sizes: HR {hh}x{hw} and LR "
            f"{lh}x{lw} (H x W) fit no whole number but several non-integer scales "
            f"(x{tight:.4g} among them), which crop the HR image differently; put the LR "
            "images of this scale in a folder named for it (X3.7/ for x3.7) beside HR/"
        )
    raise DataError(
        f"the sizes match no single scale{what}: HR {hh}x{hw}, LR {lh}x{lw} "
        f"(H x W) give x{hh / lh:.4g} vertically and x{hw / lw:.4g} "
        f"horizontally; resize or crop one of the two so that both axes share "
        f"one scale"
    )


def image_hw(path: str) -> tuple[int, int]:
    """(height, width) of an image file (local or in a bucket) from its header alone.

    Raises `DataError` naming the file when it is missing or its header unreadable.
    """
    return _header(path)[0]


def _header(path: str) -> tuple[tuple[int, int], int]:
    """((height, width), EXIF orientation, 1 when none) of an image file, as stored; see
    `image_hw`."""
    try:
        with epath.Path(path).open("rb") as f, Image.open(f) as img:
            return (img.height, img.width), img.getexif().get(ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise bomb_error(path, e) from None
    except Image.UnidentifiedImageError:  # PIL's message names the open file object
        raise DataError(
            f"cannot read image {path}: PIL does not recognise it as an image; is it a "
            "complete image file?"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
        raise DataError(f"cannot read image {path}: {e}; is it a complete image file?") from None


def _lr_folders(folder: str) -> list[str]:
    """The LR subfolders of a paired layout: 'LR' and every 'X<s>', sorted by name."""
    return sorted(
        p.name
        for p in epath.Path(folder).iterdir()
        if (p.name == "LR" or _SCALE_DIR.match(p.name)) and p.is_dir()
    )


def _by_stem(paths: list[str], where: str) -> dict[str, str]:
    out = {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in out:
            raise DataError(
                f"two images with the stem {stem!r} in {where}: "
                f"{os.path.basename(out[stem])} and {os.path.basename(p)}; "
                f"keep one"
            )
        out[stem] = p
    return out


def find_pairs(folder: str | os.PathLike) -> list[Pair] | None:
    """The pairs of a paired folder, or None when `folder` is not a paired layout.

    A paired layout is a folder with an ``HR/`` subfolder and at least one LR subfolder:
    ``LR/`` or ``X<s>/`` (DIV2K: ``X2/``, ``X3/``, ``X4/``; any scale, ``X2.5/`` too).
    Images directly in those folders (extensions as `images.image_files`) are matched by
    stem: an LR file's stem, or that stem less a trailing ``x<s>``, names its HR file.
    Every scale is read from the image headers (`pair_scale`); an ``X<s>`` folder's
    images must have the scale s it names. Pairs come sorted by LR folder, then HR stem.

    Raises:
      DataError: naming the files, when an HR or LR image has no partner, two images
        share a stem or two LR images one HR image, a header cannot be read, the two
        images of a pair carry different EXIF orientations, the sizes match no scale
        (or not the folder's; see `pair_scale`), an ``X<s>`` folder names a scale below
        1, or the layout holds no image at all.
    """
    folder = os.fspath(folder)
    hr_dir = os.path.join(folder, "HR")
    if not epath.Path(hr_dir).is_dir():
        return None
    lr_names = _lr_folders(folder)
    if not lr_names:
        return None
    hr_by_stem = _by_stem(image_files(hr_dir), hr_dir)
    matched_hr, pairs = set(), []
    for lr_name in lr_names:
        lr_dir = os.path.join(folder, lr_name)
        nominal = _SCALE_DIR.match(lr_name)
        nominal = float(nominal.group(1)) if nominal else None
        if nominal is not None and nominal < 1:
            raise DataError(
                f"{lr_dir} names x{nominal:g}, a scale below 1; an X<s>/ folder holds the LR "
                "images of scale s >= 1 (X2/, X3.7/)"
            )
        unmatched, lr_of_hr = [], {}
        for stem, lr_path in sorted(_by_stem(image_files(lr_dir), lr_dir).items()):
            hr_stem = stem if stem in hr_by_stem else _SCALE_SUFFIX.sub("", stem)
            if hr_stem not in hr_by_stem:
                unmatched.append(os.path.basename(lr_path))
                continue
            if hr_stem in lr_of_hr:  # scored twice, that image would weigh double
                raise DataError(
                    f"two images in {lr_dir} pair with {hr_by_stem[hr_stem]}: "
                    f"{os.path.basename(lr_of_hr[hr_stem])} and {os.path.basename(lr_path)}; "
                    "keep one, or move the other to the folder of its scale (X2/, X4/)"
                )
            lr_of_hr[hr_stem] = lr_path
            hr_path = hr_by_stem[hr_stem]
            names = f"{hr_path} and {lr_path}"
            (hr_hw, hr_turn), (lr_hw, lr_turn) = _header(hr_path), _header(lr_path)
            if hr_turn != lr_turn:  # read as stored, the two would not be aligned
                raise DataError(
                    f"{names} are stored turned differently (EXIF orientation {hr_turn} "
                    f"and {lr_turn}); pairs are read as stored, as the reference reads "
                    "them, so save both upright (e.g. PIL's ImageOps.exif_transpose)"
                )
            scale = pair_scale(hr_hw, lr_hw, names, nominal)
            matched_hr.add(hr_stem)
            name = hr_stem if len(lr_names) == 1 else f"{lr_name}/{hr_stem}"
            pairs.append(Pair(name, hr_path, lr_path, scale))
        if unmatched:
            raise DataError(_missing(unmatched, lr_dir, hr_dir))
    lonely = sorted(os.path.basename(p) for s, p in hr_by_stem.items() if s not in matched_hr)
    if lonely:
        raise DataError(
            _missing(lonely, hr_dir, " or ".join(os.path.join(folder, d) for d in lr_names))
        )
    if not pairs:
        raise DataError(
            f"no images in the paired folder {folder} (HR/ and "
            f"{', '.join(d + '/' for d in lr_names)} are empty)"
        )
    return pairs


def _missing(files: list[str], where: str, partner_dir: str) -> str:
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return (
        f"{len(files)} image(s) in {where} have no partner in {partner_dir}: {shown}; "
        f"add the partners or remove these files"
    )


def pair_images(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Reads a pair as (lr, hr), both uint8 RGB (see `images.load_image`).

    lr is the whole LR image, (h, w, 3). hr is the HR image cropped to the grid the LR
    covers: its top-left `metrics.covered_grid` pixels (round(h * s) x round(w * s),
    s = ``pair.scale``), which drops at most the last rows or columns that fall short of
    one LR pixel; where an LR side was rounded up, the HR side is short of that grid
    and is kept whole (evaluation predicts the whole grid and crops the prediction to it).

    Raises:
      DataError: naming the files, when they cannot be read or their sizes no longer
        give ``pair.scale``.
    """
    lr, hr = load_image(pair.lr_path), load_image(pair.hr_path)
    s = pair.scale
    if not _fits(hr.shape[:2], lr.shape[:2], s):
        raise DataError(
            f"{pair.hr_path} and {pair.lr_path} changed size since they were listed "
            f"(x{s:.4g}, now HR {hr.shape[0]}x{hr.shape[1]}, LR {lr.shape[0]}x{lr.shape[1]}); "
            "restart to list the folder again"
        )
    h, w = covered_grid(lr.shape, s)
    return lr, hr[:h, :w]
