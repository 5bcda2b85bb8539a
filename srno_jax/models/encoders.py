"""The encoders E of SRNO: EDSR(-baseline) and RDN without their upsampling tails (NHWC).

Each takes an optional `mask` (1, H, W, 1) of ones on the image and zeros on padding
added after its bottom and right edges: every convolution's output is multiplied by it,
so the next convolution sees zeros beyond the image edge, as its 'same' zero padding
gives an unpadded image. The features inside the image then equal the unpadded
encoder's, and one compiled encoder serves every image that fits its padded size.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from srno_jax.models.layers import conv, relu


def _masked(y, mask):
    return y if mask is None else y * mask.astype(y.dtype)


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv(relu(conv(x)))."""

    features: int
    res_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        y = _masked(conv(self.features, 3, self.features, "conv_0", self.dtype)(x), mask)
        y = _masked(conv(self.features, 3, self.features, "conv_1", self.dtype)(relu(y)), mask)
        return x + y * self.res_scale if self.res_scale != 1.0 else x + y


class EDSR(nn.Module):
    """EDSR without upsampling or mean shift (as LIIF/SRNO use it).

    EDSR-baseline: 16 blocks, 64 features, res_scale 1; EDSR: 32 x 256, res_scale 0.1.
    Input (B, h, w, 3) normalised; output (B, h, w, n_feats).
    """

    n_resblocks: int = 16
    n_feats: int = 64
    res_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @property
    def out_dim(self) -> int:
        return self.n_feats

    @property
    def receptive_radius(self) -> int:
        """Pixels by which an output depends on input beyond its pixel, per side: the
        head, two convs per block and the body conv, all 3x3 (34 for EDSR-baseline)."""
        return 2 * self.n_resblocks + 2

    @nn.compact
    def __call__(self, x, mask=None):
        x = _masked(conv(self.n_feats, 3, x.shape[-1], "head", self.dtype)(x), mask)
        y = x
        for i in range(self.n_resblocks):
            y = ResBlock(self.n_feats, self.res_scale, self.dtype, name=f"block_{i}")(y, mask)
        return x + _masked(conv(self.n_feats, 3, self.n_feats, "body_conv", self.dtype)(y), mask)


class RDB(nn.Module):
    """Residual dense block: n_convs densely connected conv+ReLU, 1x1 local fusion, skip."""

    g0: int
    growth: int
    n_convs: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        y = x
        for j in range(self.n_convs):
            c = self.g0 + j * self.growth
            out = _masked(conv(self.growth, 3, c, f"conv_{j}", self.dtype)(y), mask)
            y = jnp.concatenate([y, relu(out)], -1)
        return x + _masked(conv(self.g0, 1, y.shape[-1], "lff", self.dtype)(y), mask)


RDN_CONFIGS = {"A": (20, 6, 32), "B": (16, 8, 64)}  # (blocks D, convs C, growth G)


class RDN(nn.Module):
    """Residual dense network without upsampling. Config A: 20 x 6, G 32; B: 16 x 8, G 64.

    Input (B, h, w, 3) normalised; output (B, h, w, g0).
    """

    g0: int = 64
    config: str = "B"
    kernel_size: int = 3
    dtype: jnp.dtype = jnp.float32

    @property
    def out_dim(self) -> int:
        return self.g0

    @property
    def receptive_radius(self) -> int:
        """Pixels by which an output depends on input beyond its pixel, per side: sfe1,
        sfe2 and gff_1 (k x k) and every 3x3 conv of every block (1x1 fusions add
        nothing): 3 (k // 2) + blocks x convs (131 for config B, 123 for A)."""
        n_blocks, n_convs, _ = RDN_CONFIGS[self.config]
        return 3 * (self.kernel_size // 2) + n_blocks * n_convs

    @nn.compact
    def __call__(self, x, mask=None):
        n_blocks, n_convs, growth = RDN_CONFIGS[self.config]
        k = self.kernel_size
        f1 = _masked(conv(self.g0, k, x.shape[-1], "sfe1", self.dtype)(x), mask)
        y = _masked(conv(self.g0, k, self.g0, "sfe2", self.dtype)(f1), mask)
        outs = []
        for i in range(n_blocks):
            y = RDB(self.g0, growth, n_convs, self.dtype, name=f"rdb_{i}")(y, mask)
            outs.append(y)
        fused = conv(self.g0, 1, n_blocks * self.g0, "gff_0", self.dtype)(jnp.concatenate(outs, -1))
        y = _masked(fused, mask)
        return _masked(conv(self.g0, k, self.g0, "gff_1", self.dtype)(y), mask) + f1
