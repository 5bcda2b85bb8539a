"""An LR grid stored flat, possibly padded, with its true size as data rather than a shape.

Inference pads every LR input to a few sizes so that one compiled function serves many
images (`srno_jax.inference`). The lifting and the bilinear residual then read an LR map
stored as (B, capacity, C), row-major with the *true* row stride w and anything after
h * w, and take the true (h, w) from these tables, which can be traced values. The
lookups (`coords.nearest_flat_index`, `coords.sample_bilinear_flat`) never read past
h * w, so the padding does not change any output.

The tables hold the float32 numbers the reference computes (``make_coord`` centres, the
1 / h shifts) built in numpy on the host: computed in float32 on the device some would
round differently (README, "Architecture").
"""

from __future__ import annotations

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
    centres[: h * w] = make_coord((h, w)).reshape(h * w, 2)
    shift = np.array([[vx / h + EPS_SHIFT, vy / w + EPS_SHIFT] for vx, vy in OFFSETS], np.float32)
    return {"size": np.array([h, w], np.int32), "shift": shift, "centres": centres}
