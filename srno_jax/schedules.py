"""The reference's learning-rate schedule: epoch-wise warm-up, then cosine to zero."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def lr_at_epoch(epoch, base_lr=4e-5, warmup_mult=10.0, warmup_epochs=50, total_epochs=1050):
    """Learning rate during `epoch` (1-based; scalar or array, numpy or jax).

    Linear warm-up from base_lr at epoch 1 to base_lr * warmup_mult at epoch
    warmup_epochs + 1, then cosine from that peak to 0 at epoch total_epochs + 1:
    ``base * (1 + (mult - 1) * (e - 1) / warm)`` for e <= warm + 1 and
    ``peak * (1 + cos(pi * (e - warm - 1) / (total - warm))) / 2`` after. This is the
    closed form of the reference's stepped scheduler (which drifts from it by < 5e-6
    relative).
    """
    xp = jnp if not isinstance(epoch, (int, float, np.ndarray, np.number)) else np
    e = xp.asarray(epoch, dtype=xp.float32 if xp is jnp else np.float64)
    peak = base_lr * warmup_mult
    warm = base_lr * (1.0 + (warmup_mult - 1.0) * (e - 1.0) / max(warmup_epochs, 1))
    # (1 + cos(pi t)) / 2 with t the cosine phase, written as sin(pi (1 - t) / 2)^2 and
    # 1 - t formed from integers: no cancellation near the end in float32 (within 1e-6).
    rest = (total_epochs + 1.0 - e) / max(total_epochs - warmup_epochs, 1)
    cos = peak * xp.sin(np.pi / 2 * xp.clip(rest, 0.0, 1.0)) ** 2
    return xp.where(e <= warmup_epochs + 1, warm, cos)
