"""SRNO: lifting, two Galerkin-type kernel integrals, projection (Wei & Zhang, CVPR 2023).

Layouts: `inp` (B, h, w, 3) normalised to [-1, 1]; `coord` (B, H, W, 2) or (B, N, 2),
(row, col) in [-1, 1]; `cell` (B, 2), the size of one output pixel in the same units.
Inside, query points are flat: (B, N, channels).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from srno_jax.coords import gather, nearest_flat_index, sample_bilinear_flat
from srno_jax.errors import ConfigError, DataError
from srno_jax.models import fused
from srno_jax.models.grid import OFFSETS, lr_grid
from srno_jax.models.layers import LinearParams, dense, gelu

KERNEL_INTEGRALS = 2  # the paper's two kernel integral layers


def check_queries(inp, coord, cell) -> None:
    """Raises `DataError` unless `inp` is (B, h, w, 3) floating point (normalised),
    `coord` (B, ..., 2) and `cell` (B, 2) for the same B. A coord without its batch axis
    would broadcast against a batch of one and give an image of the right shape, each
    row integrated over its own queries: wrong, and silent."""
    shapes = f"inp {tuple(inp.shape)}, coord {tuple(coord.shape)}, cell {tuple(cell.shape)}"
    if len(inp.shape) != 4 or inp.shape[-1] != 3:
        raise DataError(f"inp must be (B, h, w, 3) RGB, channels last; got {shapes}")
    if not jnp.issubdtype(inp.dtype, jnp.floating):
        raise DataError(
            f"inp is {inp.dtype}; the model takes floats in [-1, 1]: convert uint8 RGB "
            "with srno_jax.images.normalise"
        )
    b = inp.shape[0]
    if len(coord.shape) < 3 or coord.shape[-1] != 2 or coord.shape[0] != b:
        raise DataError(
            f"coord must be (B, ..., 2) with inp's batch B = {b} (a grid from make_coord "
            f"needs [None]); got {shapes}"
        )
    if tuple(cell.shape) != (b, 2):
        raise DataError(f"cell must be (B, 2) with inp's batch B = {b}; got {shapes}")


def neighbours(coord, cell, grid):
    """The lifting's geometry at each query, as the reference computes it.

    For the four offsets (vx, vy) in {-1, 1}^2 of `grid.OFFSETS` (vx outer): the flat
    index of the LR pixel nearest to the shifted query, its offset rel_i = (coord - q_i)
    * (h, w) from that pixel's centre q_i, and its bilinear weight: the area
    |rel_y * rel_x| + 1e-9 of the diagonally opposite neighbour (3 - i) over the total.

    Args:
      coord: (B, N, 2) float32 query points.
      cell: (B, 2) float32.
      grid: the tables of `grid.lr_grid` (traced values allowed).
    Returns:
      (idx: 4 x int32 (B, N), rel: 4 x (B, N, 2), weight: 4 x (B, N), rel_cell = cell *
      (h, w) broadcast to (B, N, 2)), all float32.
    """
    size = grid["size"]
    scale = size.astype(jnp.float32)
    # LR pixel centres are read from make_coord's float32 table, not recomputed: at odd
    # integer scales the output depends on their exact bits (README, "Architecture").
    centres = jnp.asarray(grid["centres"])
    idxs, rels, areas = [], [], []
    for i in range(len(OFFSETS)):
        shifted = jnp.clip(coord + grid["shift"][i], -1 + 1e-6, 1 - 1e-6)
        idx = nearest_flat_index(shifted, size)
        rel = (coord - centres[idx]) * scale
        idxs.append(idx)
        rels.append(rel)
        areas.append(jnp.abs(rel[..., 0] * rel[..., 1]) + 1e-9)
    total = areas[0] + areas[1] + areas[2] + areas[3]
    weights = [areas[3 - i] / total for i in range(len(OFFSETS))]
    rel_cell = jnp.broadcast_to((cell * scale)[:, None, :], coord.shape)
    return idxs, rels, weights, rel_cell


def lifting_inputs(feat, coord, cell, grid=None):
    """The 4 * (C + 2) + 2 channels the lifting layer sees at each query point:
    [rel_0..rel_3, w_0 f_0..w_3 f_3, rel_cell] with f_i the LR feature at idx_i and the
    rest from `neighbours`.

    Args:
      feat: (B, h, w, C) encoder features; with `grid`, (B, capacity, C) stored flat as
        `grid.lr_grid` describes (rows after h * w are never read).
      coord: (B, N, 2) float32 query points.
      cell: (B, 2) float32.
      grid: None, or the tables of `grid.lr_grid` (traced values allowed).
    Returns:
      (B, N, 4 * (C + 2) + 2) array in feat's dtype (computed in float32).
    """
    if grid is None:
        b, h, w, c = feat.shape
        feat, grid = feat.reshape(b, h * w, c), lr_grid(h, w)
    dtype = feat.dtype
    # Gathered in float32: the gradient is a scatter-add, and atomic adds in bfloat16 are
    # slow on GPUs.
    feat = feat.astype(jnp.float32)
    idxs, rels, weights, rel_cell = neighbours(coord, cell, grid)
    # One gather of the four neighbours, (B, N, 4, C): its gradient is one scatter-add.
    b, n = coord.shape[:2]
    near = gather(feat, jnp.stack(idxs, -1).reshape(b, -1)).reshape(b, n, len(idxs), -1)
    weighted = (near * jnp.stack(weights, -1)[..., None]).reshape(b, n, -1)
    return jnp.concatenate([*rels, weighted, rel_cell], axis=-1).astype(dtype)


class HeadLayerNorm(nn.Module):
    """The reference's per-head LayerNorm: (x - mean) / (unbiased std + eps) * scale + bias.

    Note the *unbiased* std (n - 1) and eps added to the std, not the variance.
    Input (..., heads, d) with mean 0 over d already: `GalerkinAttention` centres the
    projection before it, so the mean is not subtracted here. Scale and bias have shape
    (heads, d).
    """

    heads: int
    d: int
    eps: float = 1e-5

    def setup(self):
        self.scale = self.param("scale", nn.initializers.ones, (self.heads, self.d))
        self.bias = self.param("bias", nn.initializers.zeros, (self.heads, self.d))

    def __call__(self, x):
        y, _, _ = fused.normalise(x.astype(jnp.float32), self.scale, self.bias, self.eps)
        return y.astype(x.dtype)


class GalerkinAttention(nn.Module):
    """One kernel integral layer: Galerkin-type linear attention over all query points.

    a = q (k^T v) / N + z per head, k and v layer-normed; out = W2 gelu(W1 a) + z.
    Cost O(N width^2). `moments` and `mix` split the layer at the sum over points, so
    inference can accumulate k^T v over chunks of queries and stay exact. With `fused`,
    the LayerNorms and k^T v of an unmasked `moments` run as `fused.head_moments`'s
    Pallas kernel (through Triton on a GPU, as plain JAX elsewhere).
    """

    width: int
    heads: int
    dtype: Any = jnp.float32
    fused: bool = False
    mesh: Any = None  # with `fused`: the mesh a jitted step splits the batch over

    def setup(self):
        self.qkv_proj = LinearParams(3 * self.width, self.width)
        d = self.width // self.heads
        self.k_norm = HeadLayerNorm(self.heads, d)
        self.v_norm = HeadLayerNorm(self.heads, d)
        self.o_proj1 = LinearParams(self.width, self.width)
        self.o_proj2 = dense(self.width, self.width, dtype=self.dtype)

    def _qkv_params(self):
        """((Wq, bq), (Wkv, bkv)): kernels (width, heads, d | 2d), biases (heads, d | 2d).

        Per head the reference's 3d output channels are contiguous, q then k then v.
        """
        w, b = self.qkv_proj()
        d = self.width // self.heads
        w, b = w.reshape(self.width, self.heads, 3 * d), b.reshape(self.heads, 3 * d)
        return (w[..., :d], b[:, :d]), (w[..., d:], b[:, d:])

    def moments(self, z, mask=None):
        """Sum over the query points of k^T v: (B, N, width) -> (B, heads, d, d), float32.

        `mask` (broadcastable to (B, N), 1 or 0) leaves out padded points.
        """
        _, (w, b) = self._qkv_params()
        d = self.width // self.heads
        # The per-head mean of z W + b is z mean(W) + mean(b): centring the columns of W
        # and b here saves the LayerNorm a pass over the (B, N, width) output.
        w, b = w.reshape(self.width, self.heads, 2, d), b.reshape(self.heads, 2, d)
        w, b = w - w.mean(-1, keepdims=True), (b - b.mean(-1, keepdims=True)).astype(self.dtype)
        flat = z.reshape(-1, self.width)  # 2-D products
        if self.fused and mask is None and fused.supports(z.shape[1], d):
            # One product for k and v, its columns (heads, 2, d) as they are stored: the
            # kernel reads each head's k and v together, 2 d contiguous values a point.
            joint = w.reshape(self.width, 2 * self.width).astype(self.dtype)
            x = (flat @ joint).reshape(*z.shape[:2], self.heads, 2, d)
            k_norm, v_norm = self.k_norm, self.v_norm
            return fused.head_moments(
                x,
                *(b[:, 0], k_norm.scale, k_norm.bias, b[:, 1], v_norm.scale, v_norm.bias),
                k_norm.eps,
                jax.default_backend() != "gpu",
                self.mesh,
            )
        # Two products rather than one of width 2 x width: XLA:CPU would copy k and v out
        # of the joint output, and concatenate their gradients back.
        k, v = (
            (flat @ w[:, :, i].reshape(self.width, -1).astype(self.dtype)).reshape(
                *z.shape[:2], self.heads, d
            )
            + b[:, i]
            for i in range(2)
        )
        k, v = self.k_norm(k), self.v_norm(v)
        if mask is not None:
            k = k * jnp.broadcast_to(mask, k.shape[:2])[..., None, None].astype(k.dtype)
        return jnp.einsum("bnhd,bnhe->bhde", k, v, preferred_element_type=jnp.float32)

    def mix(self, z, kv):
        """The layer's output at points z given kv = (sum of k^T v) / N (B, heads, d, d)."""
        (wq, bq), _ = self._qkv_params()
        w1, b1 = self.o_proj1()
        b = z.shape[0]
        # W1 (q kv + z) with q = z Wq + bq is z (Wq kv + I) W1 + bq kv W1: one width x width
        # matrix per image instead of the q projection and o_proj1 at every point.
        mixing = jnp.einsum("chd,bhde->bche", wq, kv).reshape(b, self.width, self.width)
        folded = jnp.einsum("bcw,wo->bco", mixing + jnp.eye(self.width), w1)
        shift = jnp.einsum("hd,bhde->bhe", bq, kv).reshape(b, self.width) @ w1 + b1
        h = jnp.einsum("bnc,bco->bno", z, folded.astype(self.dtype)) + shift[:, None].astype(
            self.dtype
        )
        return self.o_proj2(gelu(h)) + z

    def __call__(self, z):
        return self.mix(z, self.moments(z) / z.shape[1])


class Projection(nn.Module):
    """Q: width -> 256 -> 3 with an exact GELU between (the reference's fc1, fc2)."""

    width: int
    hidden: int = 256
    out_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        z = gelu(dense(self.hidden, self.width, "fc1", self.dtype)(z))
        return dense(self.out_channels, self.hidden, "fc2", self.dtype)(z)


class SRNO(nn.Module):
    """The Super-Resolution Neural Operator.

    ``model.apply(variables, inp, coord, cell)`` -> prediction shaped like `coord` with 3
    channels, normalised like `inp` (add 1, halve and clamp to [0, 1] for an image).
    """

    encoder: nn.Module
    width: int = 256
    heads: int = 16
    dtype: Any = jnp.float32
    fused: bool = False  # GalerkinAttention's `fused` and `mesh`
    mesh: Any = None

    def setup(self):
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        self.lifting = LinearParams(self.width, 4 * (self.encoder.out_dim + 2) + 2)
        self.kernel_integrals = [
            GalerkinAttention(self.width, self.heads, self.dtype, self.fused, self.mesh)
            for _ in range(KERNEL_INTEGRALS)
        ]
        self.projection = Projection(self.width, dtype=self.dtype)

    def encode(self, inp, mask=None):
        """E: (B, h, w, 3) normalised -> features (B, h, w, C); `mask` as the encoder's."""
        return self.encoder(inp.astype(self.dtype), mask)

    def lift(self, feat, coord, cell, grid=None):
        """P: features and flat queries (B, N, 2) -> z (B, N, width); `grid` as in
        `lifting_inputs`."""
        x = lifting_inputs(feat, coord, cell, grid)
        kernel, bias = self.lifting()
        return x @ kernel.astype(self.dtype) + bias.astype(self.dtype)

    def lift_table(self, feat):
        """The lifting's kernel rows for each neighbour's features applied to every LR
        feature: flat features (B, P, C) -> (B, 4 P, width) float32, row 4 p + i for
        neighbour i at pixel p. P is then gathered instead of computed at each query:
        h w products instead of N (16x fewer at x4), 4 x width floats per LR pixel."""
        kernel, _ = self.lifting()
        b, p, c = feat.shape
        rows = kernel[4 * 2 : 4 * (c + 2)].reshape(4, c, self.width).astype(jnp.float32)
        return jnp.einsum("bpc,icw->bpiw", feat.astype(jnp.float32), rows).reshape(b, 4 * p, -1)

    def lift_from_table(self, table, coord, cell, grid):
        """P at flat queries (B, N, 2) from `lift_table`'s table of the flat features that
        `grid` describes: `lift` up to float rounding (the sum of the 1x1 layer's
        products is taken in another order). -> z (B, N, width)."""
        kernel, bias = self.lifting()
        idxs, rels, weights, rel_cell = neighbours(coord, cell, grid)
        b, n = coord.shape[:2]
        rows = jnp.stack([4 * idx + i for i, idx in enumerate(idxs)], -1).reshape(b, 4 * n)
        feats = gather(table, rows).reshape(b, n, len(idxs), -1)
        geometry = jnp.concatenate([*rels, rel_cell], -1)  # the 1x1 layer's first 8 and last 2 rows
        z = (
            geometry @ jnp.concatenate([kernel[: 4 * 2], kernel[-2:]])
            + bias
            + jnp.einsum("bni,bniw->bnw", jnp.stack(weights, -1), feats)
        )
        return z.astype(self.dtype)

    def project(self, z, inp, coord, grid=None):
        """Q plus the bilinear residual: z (B, N, width) -> (B, N, 3) float32. `inp` is
        (B, h, w, 3), or with `grid` (B, capacity, 3) stored flat like the features."""
        if grid is None:
            b, h, w, c = inp.shape
            inp, grid = inp.reshape(b, h * w, c), lr_grid(h, w)
        return self.projection(z).astype(jnp.float32) + sample_bilinear_flat(
            inp, coord, grid["size"]
        )

    def query(self, inp, feat, coord, cell):
        """The operator at a set of queries (all at once; see inference.py for chunks)."""
        check_queries(inp, coord, cell)
        flat = coord.reshape(coord.shape[0], -1, 2)
        z = self.lift(feat, flat, cell)
        for layer in self.kernel_integrals:
            z = layer(z)
        return self.project(z, inp, flat).reshape(*coord.shape[:-1], 3)

    def __call__(self, inp, coord, cell):
        check_queries(inp, coord, cell)  # before the encoder fails on them less clearly
        return self.query(inp, self.encode(inp), coord, cell)
