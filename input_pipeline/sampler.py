"""Training samples: the reference's random-scale ``SRImplicitDownsampledFast``, and
aligned patches of given LR / HR pairs.

One image (uint8, HWC) or pair and a ``np.random.Generator`` give one sample; every
random draw comes from that generator, in the reference's order (scale, crop corner,
flips, query points; a pair has no scale draw).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from PIL import Image

from srno_jax.coords import make_coord
from srno_jax.errors import ConfigError
from srno_jax.images import normalise, resize_bicubic

# A child of the package's logger, which main.py shows; the root logger is absl's.
log = logging.getLogger("srno_jax.data")
_warned_small: set = set()
_warned_lock = threading.Lock()


def check_sampler_settings(
    inp_size: int, scale_min: float, scale_max: float, sample_q: int | None
) -> int:
    """Raises `ConfigError` for sampler settings that cannot work; returns sample_q.

    Needs inp_size >= 1, 1 <= scale_min <= scale_max and 1 <= sample_q <= inp_size**2
    (the smallest HR crop has inp_size**2 pixels); sample_q None means inp_size**2.
    """
    if inp_size < 1:
        raise ConfigError(f"inp_size must be >= 1, got {inp_size}")
    if not 1.0 <= scale_min <= scale_max:
        raise ConfigError(f"need 1 <= scale_min <= scale_max, got {scale_min}, {scale_max}")
    sample_q = inp_size**2 if sample_q is None else sample_q
    if not 1 <= sample_q <= inp_size**2:
        raise ConfigError(f"sample_q must be in [1, inp_size**2 = {inp_size**2}], got {sample_q}")
    return sample_q


def _warn_once(key, message: str, *args) -> None:
    """Logs `message` the first time this process sees `key` (an image and a reason)."""
    with _warned_lock:
        first = key not in _warned_small
        _warned_small.add(key)
    if first:
        log.warning(message, *args)


def _upscale_to(hr: np.ndarray, short: int, name) -> np.ndarray:
    """PIL bicubic upscale so the short side is `short` (long side rounded half-to-even)."""
    h, w = hr.shape[:2]
    _warn_once(
        (name, "upscaled"),
        "image %s is %dx%d, smaller than inp_size %d: upscaled (bicubic) for training",
        name,
        h,
        w,
        short,
    )
    f = short / min(h, w)
    return np.asarray(Image.fromarray(hr).resize((round(w * f), round(h * f)), Image.BICUBIC))


def sample_patch(
    hr: np.ndarray,
    rng: np.random.Generator,
    *,
    inp_size: int = 128,
    scale_min: float = 1.0,
    scale_max: float = 4.0,
    augment: bool = True,
    sample_q: int | None = None,
    name=None,
) -> dict:
    """One training sample from an HR image, as the reference's ``__getitem__``.

    s ~ U(scale_min, scale_max); the HR crop is w_hr x w_hr, w_hr = round(inp_size * s)
    (Python round: half to even), its top-left (x0, y0) uniform in [0, H - w_hr] x
    [0, W - w_hr] (inclusive); the LR input is the PIL bicubic resize of the uint8 crop
    to inp_size x inp_size. With `augment`, three coin flips (flip rows, flip columns,
    transpose, in that order) act alike on LR and HR. `sample_q` HR pixels, drawn
    without replacement, give `coord` (their `make_coord` centres in the augmented crop,
    (row, col) in [-1, 1]) and `gt`. Unlike the reference, which crashes there:
    - a side shorter than w_hr lowers this sample's scale: w_hr = min(H, W), with one
      warning per `name` where scale_max would need more;
    - an image whose short side is below inp_size is first upscaled (PIL bicubic) so
      its short side is inp_size, with one warning per `name`.

    The settings are not checked here, for every sample: `check_sampler_settings` checks
    them once, where the loader is built.

    Args:
      hr: (H, W, 3) uint8 HR image.
      rng: the sample's generator; the sample is a function of it alone.
      sample_q: None means inp_size**2.
      name: names the image in the small-image warning.
    Returns:
      float32 numpy arrays: ``inp`` (inp_size, inp_size, 3) and ``gt`` (sample_q, 3),
      normalised to [-1, 1]; ``coord`` (sample_q, 2); ``cell`` (2,) = 2 / w_hr twice.
    """
    if min(hr.shape[:2]) < inp_size:
        hr = _upscale_to(hr, inp_size, name)
    h, w = hr.shape[:2]
    if min(h, w) < round(inp_size * scale_max):
        _warn_once(
            (name, "capped"),
            "image %s is %dx%d, smaller than the x%g crop (%d pixels): its samples above "
            "x%.3g are taken at x%.3g",
            name,
            h,
            w,
            scale_max,
            round(inp_size * scale_max),
            min(h, w) / inp_size,
            min(h, w) / inp_size,
        )
    s = rng.uniform(scale_min, scale_max)
    w_hr = min(round(inp_size * s), h, w)
    x0 = int(rng.integers(0, h - w_hr + 1))
    y0 = int(rng.integers(0, w - w_hr + 1))
    crop = hr[x0 : x0 + w_hr, y0 : y0 + w_hr]
    lr = resize_bicubic(np.ascontiguousarray(crop), (inp_size, inp_size))
    return _augment_and_query(lr, crop, rng, augment, sample_q or inp_size**2)


def sample_pair_patch(
    lr: np.ndarray,
    hr: np.ndarray,
    scale: float,
    rng: np.random.Generator,
    *,
    inp_size: int = 128,
    augment: bool = True,
    sample_q: int | None = None,
) -> dict:
    """One training sample from a given LR / HR pair of fixed `scale` (`srno_jax.pairs`).

    The LR patch is inp_size x inp_size with its top-left (x0, y0) uniform in
    [0, h - inp_size] x [0, w - inp_size] (inclusive); the HR patch is w_hr x w_hr,
    w_hr = round(inp_size * scale), at (min(round(x0 * scale), H - w_hr),
    min(round(y0 * scale), W - w_hr)) (Python round, half to even). Each query's `coord`
    is where its HR pixel's centre lies on the LR patch, ((hx0 + r + 0.5) / scale - x0) /
    inp_size * 2 - 1 for HR row r (columns alike; a little beyond [-1, 1] where the crop
    overhangs the patch: by less than an LR pixel, plus the rows the HR image lacks where
    an LR side was rounded up), and ``cell`` is one HR pixel there, 2 / (inp_size
    * scale): exact at any scale, equal to the crop's own grid at integer ones. Flips and
    query points then follow `sample_patch` (same draws, same order); the scale is the
    pair's, not drawn.

    Args:
      lr: (h, w, 3) uint8 LR image, h, w >= inp_size (the loader checks this once).
      hr: (H, W, 3) uint8 HR image covering the LR grid: H = round(h * scale),
        W = round(w * scale), as `pairs.pair_images` returns it.
      scale: the pair's scale, >= 1.
      sample_q: None means inp_size**2.
    Returns:
      as `sample_patch`, with ``coord`` and ``cell`` as above.
    """
    h, w = lr.shape[:2]
    w_hr = round(inp_size * scale)
    x0 = int(rng.integers(0, h - inp_size + 1))
    y0 = int(rng.integers(0, w - inp_size + 1))
    hx0 = min(round(x0 * scale), hr.shape[0] - w_hr)
    hy0 = min(round(y0 * scale), hr.shape[1] - w_hr)
    crop = hr[hx0 : hx0 + w_hr, hy0 : hy0 + w_hr]
    # Where each HR row's and column's centre lies on the LR patch, in [-1, 1]: exactly,
    # where the crop's own grid would be up to an HR pixel off at non-integer scales.
    at = lambda start, lr_start: (
        ((start + np.arange(w_hr) + 0.5) / scale - lr_start) / inp_size * 2 - 1
    ).astype(np.float32)
    return _augment_and_query(
        lr[x0 : x0 + inp_size, y0 : y0 + inp_size],
        crop,
        rng,
        augment,
        sample_q or inp_size**2,
        positions=(at(hx0, x0), at(hy0, y0)),
        cell=np.float32(2 / (inp_size * scale)),
    )


def _augment_and_query(
    lr: np.ndarray,
    crop: np.ndarray,
    rng: np.random.Generator,
    augment: bool,
    sample_q: int,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
    cell=None,
) -> dict:
    """The sample from an LR patch and its square HR crop: flips, then query points.

    `positions`: where the crop's rows and columns lie on the LR patch, in [-1, 1], before
    the flips; None: the crop's own `make_coord` grid, as the reference. `cell`: one HR
    pixel's size there; None: 2 / w_hr.
    """
    w_hr = crop.shape[0]
    flips = [rng.random() < 0.5 for _ in range(3)] if augment else [False] * 3
    lr = _augment(lr, *flips)
    idx = rng.choice(w_hr * w_hr, sample_q, replace=False)
    # Row and column of each drawn pixel in the augmented crop, and where that pixel sits
    # in the crop itself: no augmented copy of the crop and no full coordinate grid.
    row, col = np.divmod(idx, w_hr)
    flip_rows, flip_cols, transpose = flips
    i, j = (col, row) if transpose else (row, col)
    ci, cj = w_hr - 1 - i if flip_rows else i, w_hr - 1 - j if flip_cols else j
    gt = crop[ci, cj]
    if positions is None:  # a grid symmetric about 0: the augmented crop's own
        axis = make_coord((w_hr,))[:, 0]
        coord = np.stack([axis[row], axis[col]], axis=-1)
    else:  # the unflipped positions, then the flips (a flip negates, transpose swaps)
        x = -positions[0][ci] if flip_rows else positions[0][ci]
        y = -positions[1][cj] if flip_cols else positions[1][cj]
        coord = np.stack([y, x] if transpose else [x, y], axis=-1)
    return {
        "inp": normalise(lr),
        "coord": coord,
        "cell": np.full((2,), 2 / w_hr if cell is None else cell, np.float32),
        "gt": normalise(gt),
    }


def _augment(x: np.ndarray, flip_rows: bool, flip_cols: bool, transpose: bool) -> np.ndarray:
    if flip_rows:
        x = x[::-1]
    if flip_cols:
        x = x[:, ::-1]
    if transpose:
        x = x.transpose(1, 0, 2)
    return x
