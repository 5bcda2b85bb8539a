"""An LR grid stored flat, possibly padded, with its true size as data rather than a shape.

Inference pads every LR input to a few sizes so that one compiled function serves many
images (`srno_jax.inference`). The lifting and the bilinear residual then read an LR map
stored as (B, capacity, C), row-major with the *true* row stride w and anything after
h * w, and take the true (h, w) from `LRGrid` tables, which can be traced values. The
lookups below never read past h * w, so the padding does not change any output.

The tables hold the float32 numbers the reference computes (``make_coord`` centres, the
1 / h shifts) built in numpy on the host: computed in float32 on the device some would
round differently (README, "Architecture").
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from srno_jax.coords import make_coord

EPS_SHIFT = 1e-6  # the reference's nudge off exact pixel boundaries
# The lifting's four neighbours: offsets (vx, vy) in {-1, 1}^2, vx outer, as the reference.
OFFSETS = tuple((vx, vy) for vx in (-1, 1) for vy in (-1, 1))


def lr_grid(h: int, w: int, capacity: int | None = None) -> dict:
    """Host tables of an h x w LR grid stored flat in `capacity` >= h * w rows.

    Returns {'size': int32 (2,) = (h, w); 'shift': float32 (4, 2), the reference's query
    shift (vx / h + 1e-6, vy / w + 1e-6) per neighbour of `OFFSETS`; 'centres': float32
    (capacity, 2), make_coord((h, w)) flattened, zeros after h * w}.
    """
    capacity = h * w if capacity is None else capacity
    centres = np.zeros((capacity, 2), np.float32)
    centres[:h * w] = make_coord((h, w)).reshape(h * w, 2)
    shift = np.array([[vx / h + EPS_SHIFT, vy / w + EPS_SHIFT] for vx, vy in OFFSETS], np.float32)
    return {"size": np.array([h, w], np.int32), "shift": shift, "centres": centres}


def _position(c, n):
    """The reference's unnormalised position (c + 1) (n / 2) - 1/2 along an axis of n
    pixels, in float32 (n / 2 is exact for n < 2^24)."""
    return (c + 1.0) * (n.astype(jnp.float32) / 2) - np.float32(0.5)


def nearest_flat_index(coord, size):
    """Row-major index (stride size[1]) of the LR pixel nearest to each coordinate.

    torch ``grid_sample(mode='nearest', align_corners=False)``: the position rounded half
    to even, clipped to the grid (every caller clamps coordinates into (-1, 1) first).
    coord (..., 2) float32 (row, col); size int32 (2,), may be traced. Returns int32 (...).
    """
    h, w = size[0], size[1]
    iy = jnp.clip(jnp.round(_position(coord[..., 0], h)), 0, h - 1).astype(jnp.int32)
    ix = jnp.clip(jnp.round(_position(coord[..., 1], w)), 0, w - 1).astype(jnp.int32)
    return iy * w + ix


def gather(flat, idx):
    """flat (B, capacity, C) at idx (B, N) -> (B, N, C)."""
    return jnp.take_along_axis(flat, idx[..., None], axis=1)


def sample_bilinear_flat(img, coord, size):
    """Bilinear sample with border padding of a flat-stored image at coordinates.

    torch ``grid_sample(mode='bilinear', padding_mode='border', align_corners=False)``,
    (row, col) order. img (B, capacity, C) row-major with stride size[1]; coord (B, N, 2)
    float32 in [-1, 1] (outside reads the border); size int32 (2,) = (h, w), may be
    traced. Returns (B, N, C).
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
    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1))
            + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1)))
