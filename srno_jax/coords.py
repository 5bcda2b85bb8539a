"""Coordinates and sampling with the exact semantics of the reference.

Conventions: coordinates are float32 in [-1, 1]; the last axis is (row, col), i.e.
(y, x) -- the reference's order, *not* torch ``grid_sample``'s (x, y). Pixel i of an
axis of length n has its centre at -1 + (2 i + 1) / n (``align_corners=False``).
Feature maps and images are NHWC.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def make_coord(shape) -> np.ndarray:
    """Pixel-centre coordinates of a grid, exactly as the reference's ``make_coord``.

    Args:
      shape: the grid size per axis, e.g. (H, W).
    Returns:
      float32 array of shape (*shape, len(shape)); entry [..., k] is the coordinate along
      axis k. Along an axis of length n the values are
      ``float32(-1 + 1/n) + float32(2/n) * float32(i)``, rounded to float32 after each
      operation as torch does; built in numpy because an XLA multiply-add may fuse and
      round once, which moves some coordinates by one ulp (and the output at odd
      integer scales by ~0.03, see docs).
    """
    axes = []
    for n in shape:
        r = 1.0 / n
        start = np.float32(-1.0 + r)
        step = np.float32(2.0 * r)
        axes.append(start + step * np.arange(n, dtype=np.float32))
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack(grid, axis=-1).astype(np.float32)


def nearest_index(c, size: int):
    """Index of the pixel nearest to coordinate `c` along an axis of `size` pixels.

    Exactly torch ``grid_sample(mode='nearest', align_corners=False)`` on CPU: the
    unnormalised position ``(c + 1) * (size / 2) - 0.5`` in float32, rounded half to
    even. The result is clipped to [0, size - 1]; torch would read zeros outside, but
    every caller here clamps coordinates into (-1, 1) first, where no clipping occurs.

    Args:
      c: float32 array of coordinates in [-1, 1].
      size: number of pixels along the axis.
    Returns:
      int32 array shaped like `c`.
    """
    pos = (c + 1.0) * np.float32(size / 2) - np.float32(0.5)
    return jnp.clip(jnp.round(pos), 0, size - 1).astype(jnp.int32)


def sample_bilinear(img, coord):
    """Bilinear sample of an image at coordinates, with border padding.

    Exactly torch ``grid_sample(mode='bilinear', padding_mode='border',
    align_corners=False)`` with the (row, col) coordinate order of this package.

    Args:
      img: (B, h, w, C) array.
      coord: (B, N, 2) float32, (row, col) in [-1, 1]; values outside sample the
        border pixels.
    Returns:
      (B, N, C) array.
    """
    b, h, w, ch = img.shape

    def axis(c, size):
        pos = jnp.clip((c + 1.0) * np.float32(size / 2) - np.float32(0.5), 0, size - 1)
        i0 = jnp.floor(pos)
        frac = pos - i0
        i0 = i0.astype(jnp.int32)
        return i0, jnp.minimum(i0 + 1, size - 1), frac

    y0, y1, fy = axis(coord[..., 0], h)
    x0, x1, fx = axis(coord[..., 1], w)
    flat = img.reshape(b, h * w, ch)

    def gather(iy, ix):
        return jnp.take_along_axis(flat, (iy * w + ix)[..., None], axis=1)

    fy, fx = fy[..., None], fx[..., None]
    return ((1 - fy) * ((1 - fx) * gather(y0, x0) + fx * gather(y0, x1))
            + fy * ((1 - fx) * gather(y1, x0) + fx * gather(y1, x1)))
