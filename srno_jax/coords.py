"""Coordinates and sampling with the exact semantics of the reference.

Conventions: coordinates are float32 in [-1, 1]; the last axis is (row, col), i.e.
(y, x) -- the reference's order, *not* torch ``grid_sample``'s (x, y). Pixel i of an
axis of length n has its centre at -1 + (2 i + 1) / n (``align_corners=False``).
Feature maps and images are NHWC.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from srno_jax.errors import ConfigError


def make_coord(shape) -> np.ndarray:
    """Pixel-centre coordinates of a grid, exactly as the reference's ``make_coord``.

    Args:
      shape: the grid size per axis, e.g. (H, W), each a whole number >= 1 (else
        `ConfigError`).
    Returns:
      float32 array of shape (*shape, len(shape)); entry [..., k] is the coordinate along
      axis k. Along an axis of length n the values are
      ``float32(-1 + 1/n) + float32(2/n) * float32(i)``, rounded to float32 after each
      operation as torch does; built in numpy because an XLA multiply-add may fuse and
      round once, which moves some coordinates by one ulp: at odd integer scales some
      HR centres then no longer coincide with LR centres, and the output moves by up
      to 0.03 (the golden case `grid_x7_mcell`, README "Architecture").
    """
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shape):
        raise ConfigError(f"grid size {tuple(shape)} must be whole numbers >= 1")
    axes = []
    for n in shape:
        r = 1.0 / n
        start = np.float32(-1.0 + r)
        step = np.float32(2.0 * r)
        axes.append(start + step * np.arange(n, dtype=np.float32))
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack(grid, axis=-1).astype(np.float32)


def _position(c, n):
    """The reference's unnormalised position (c + 1) (n / 2) - 1/2 along an axis of n
    pixels, in float32 (n / 2 is exact for n < 2^24); n is an int32 array, may be traced."""
    return (c + 1.0) * (n.astype(jnp.float32) / 2) - np.float32(0.5)


def nearest_index(c, size: int):
    """Index of the pixel nearest to coordinate `c` along an axis of `size` pixels.

    Exactly torch ``grid_sample(mode='nearest', align_corners=False)`` on CPU: the
    unnormalised position ``(c + 1) * (size / 2) - 0.5`` in float32, rounded half to
    even. The result is clipped to [0, size - 1], where torch would read zeros; the
    clip acts only within half an ulp of +-1 (c = 1 gives size - 1), and the lifting,
    this function's caller, clamps coordinates to [-1 + 1e-6, 1 - 1e-6] first as the
    reference does.

    Args:
      c: float32 array of coordinates.
      size: number of pixels along the axis (an int, or an int32 array that may be traced).
    Returns:
      int32 array shaped like `c`.
    """
    n = jnp.asarray(size, jnp.int32) if not isinstance(size, int) else np.int32(size)
    return jnp.clip(jnp.round(_position(c, n)), 0, n - 1).astype(jnp.int32)


def nearest_flat_index(coord, size):
    """Row-major index (stride size[1]) of the pixel nearest to each coordinate.

    `nearest_index` along both axes. coord (..., 2) float32 (row, col); size int32 (2,) =
    (h, w), may be traced. Returns int32 (...).
    """
    return nearest_index(coord[..., 0], size[0]) * size[1] + nearest_index(coord[..., 1], size[1])


def gather(flat, idx):
    """flat (B, capacity, C) at idx (B, N) -> (B, N, C)."""
    return jnp.take_along_axis(flat, idx[..., None], axis=1)


def sample_bilinear_flat(img, coord, size):
    """Bilinear sample with border padding of a flat-stored image at coordinates.

    torch ``grid_sample(mode='bilinear', padding_mode='border', align_corners=False)``
    in (row, col) order: the same four pixels and fractions, in float32; the weighted
    sum is taken as (1 - fy) row0 + fy row1, which can differ from torch's order in
    the last bit (up to 4e-7 on values in [-1, 1]). img (B, capacity, C) row-major with
    stride size[1] (rows after h * w are never read); coord (B, N, 2) float32 in
    [-1, 1] (outside reads the border); size int32 (2,) = (h, w), may be traced.
    Returns (B, N, C) in the promoted dtype of img and coord (float32 for a bfloat16
    image).
    """

    def axis(c, n):
        pos = jnp.clip(_position(c, n), 0, (n - 1).astype(jnp.float32))
        i0 = jnp.floor(pos)
        frac = pos - i0
        i0 = i0.astype(jnp.int32)
        return i0, jnp.minimum(i0 + 1, n - 1), frac[..., None]

    h, w = size[0], size[1]
    y0, y1, fy = axis(coord[..., 0], h)
    x0, x1, fx = axis(coord[..., 1], w)
    at = lambda iy, ix: gather(img, iy * w + ix)
    return (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * (
        (1 - fx) * at(y1, x0) + fx * at(y1, x1)
    )


def sample_bilinear(img, coord):
    """Bilinear sample of an image at coordinates, with border padding.

    `sample_bilinear_flat` of an image stored as (B, h, w, C).

    Args:
      img: (B, h, w, C) array.
      coord: (B, N, 2) float32, (row, col) in [-1, 1]; values outside sample the
        border pixels.
    Returns:
      (B, N, C) array.
    """
    b, h, w, ch = img.shape
    return sample_bilinear_flat(img.reshape(b, h * w, ch), coord, np.array([h, w], np.int32))
