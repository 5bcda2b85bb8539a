"""The encoders E of SRNO: EDSR(-baseline) and RDN without their upsampling tails (NHWC)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from srno_jax.models.layers import conv


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale * conv(relu(conv(x)))."""
    features: int
    res_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = conv(self.features, 3, self.features, "conv_0", self.dtype)(x)
        y = conv(self.features, 3, self.features, "conv_1", self.dtype)(nn.relu(y))
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

    @nn.compact
    def __call__(self, x):
        x = conv(self.n_feats, 3, x.shape[-1], "head", self.dtype)(x)
        y = x
        for i in range(self.n_resblocks):
            y = ResBlock(self.n_feats, self.res_scale, self.dtype, name=f"block_{i}")(y)
        return x + conv(self.n_feats, 3, self.n_feats, "body_conv", self.dtype)(y)


class RDB(nn.Module):
    """Residual dense block: n_convs densely connected conv+ReLU, 1x1 local fusion, skip."""
    g0: int
    growth: int
    n_convs: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = x
        for j in range(self.n_convs):
            c = self.g0 + j * self.growth
            y = jnp.concatenate([y, nn.relu(conv(self.growth, 3, c, f"conv_{j}", self.dtype)(y))], -1)
        return x + conv(self.g0, 1, y.shape[-1], "lff", self.dtype)(y)


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

    @nn.compact
    def __call__(self, x):
        n_blocks, n_convs, growth = RDN_CONFIGS[self.config]
        k = self.kernel_size
        f1 = conv(self.g0, k, x.shape[-1], "sfe1", self.dtype)(x)
        y = conv(self.g0, k, self.g0, "sfe2", self.dtype)(f1)
        outs = []
        for i in range(n_blocks):
            y = RDB(self.g0, growth, n_convs, self.dtype, name=f"rdb_{i}")(y)
            outs.append(y)
        y = conv(self.g0, 1, n_blocks * self.g0, "gff_0", self.dtype)(jnp.concatenate(outs, -1))
        return conv(self.g0, k, self.g0, "gff_1", self.dtype)(y) + f1
