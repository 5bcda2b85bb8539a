"""Exact, memory-bounded SRNO inference over chunks of query points (pure JAX).

Both kernel integrals average k^T v over *all* N query points, so evaluating the queries
in independent chunks (as the reference's ``batched_predict`` does) changes the output.
`predict` instead runs three passes: pass 1 sums layer 1's k^T v over every query,
pass 2 computes layer 1's output with kv1 = sum / N and sums layer 2's k^T v, pass 3
computes layer 2's output and projects. When all queries fit in one chunk (the default
up to 2^18 of them, a 512 x 512 output) each layer's input is kept between the passes
and nothing is computed twice. Beyond that, the queries go in chunks and each pass
recomputes the lifting (and pass 3 layer 1) chunk by chunk, about 2.1x the work of one
pass: peak memory then grows with the chunk size, not with the output size. Inside a
chunk, every pass walks sub-chunks of SUB_CHUNK queries with `jax.lax.map`, which
keeps their buffers in the CPU's caches (`_sub_map`).

Compilation: the last chunk is padded to the chunk size by repeating the last valid
query and masked out of the sums, and the chunk size is capped at the next power of two
>= N, so the jitted functions depend only on (model, LR input shape, chunk size): any
output size or scale from one LR shape reuses them.

Large LR inputs are encoded in overlapping windows whose halo covers the encoder's
receptive field, which gives the full-image features (see `encode`).
"""
from __future__ import annotations

import math
from functools import cache, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srno_jax import compiler
from srno_jax.errors import ConfigError
from srno_jax.models.encoders import EDSR, RDN, RDN_CONFIGS
from srno_jax.models.srno import KERNEL_INTEGRALS

DEFAULT_CHUNK = 2**18  # queries per chunk: one chunk keeps 2 x chunk x width floats (512 MB)
SUB_CHUNK = 2048  # queries per inner step of a pass (see `_sub_map`)
DEFAULT_TILE = 512  # LR window side for encoding large inputs


def receptive_radius(encoder: nn.Module) -> int:
    """Pixels by which the encoder's output depends on input beyond a pixel, per side.

    EDSR: head + 2 convs per block + body conv, all 3x3: 2 * n_resblocks + 2 (34 for
    EDSR-baseline). RDN: sfe1, sfe2 and gff_1 (k x k), and every 3x3 conv of every RDB
    (1x1 fusions add nothing): 3 * (k // 2) + blocks * convs (131 for config B, 123 for A).
    """
    if isinstance(encoder, EDSR):
        return 2 * encoder.n_resblocks + 2
    if isinstance(encoder, RDN):
        n_blocks, n_convs, _ = RDN_CONFIGS[encoder.config]
        return 3 * (encoder.kernel_size // 2) + n_blocks * n_convs
    raise ConfigError(f"unknown receptive field for encoder {type(encoder).__name__}")


@cache
def _encoder():
    """The jitted encoder, compiled with `compiler.conv_options` (built on first use, since
    choosing the options initialises the backend)."""
    def encode_fn(model, variables, inp):
        return model.apply(variables, inp, method=lambda m, x: m.encode(x))
    return jax.jit(encode_fn, static_argnums=0, compiler_options=compiler.conv_options())


def _windows(n: int, tile: int, halo: int):
    """(window start, core start, core end) along an axis of n pixels; windows are `tile`
    long (or n when n <= tile) and each core pixel lies >= halo from any window edge that
    is not an image edge, where the windows' zero padding differs from the image's."""
    if n <= tile:
        return [(0, 0, n)]
    core = tile - 2 * halo
    return [(min(max(c - halo, 0), n - tile), c, min(c + core, n)) for c in range(0, n, core)]


def encode(model, variables, inp, tile: int = DEFAULT_TILE) -> jax.Array:
    """Encoder features of `inp` (B, h, w, 3) normalised -> (B, h, w, C) float32.

    When h or w exceeds `tile`, the input is encoded in tile x tile windows overlapping
    by the encoder's receptive radius (`receptive_radius`), and only each window's core
    is kept: equal to the full-image encoder up to float rounding, with one compiled
    window shape for all large inputs. Raises `ConfigError` if tile <= 2 * radius.
    """
    h, w = inp.shape[1:3]
    if h <= tile and w <= tile:
        return _encoder()(model, variables, jnp.asarray(inp))
    halo = receptive_radius(model.encoder)
    if tile <= 2 * halo:
        raise ConfigError(f"encoder tile {tile} must exceed twice the encoder's receptive "
                          f"radius {halo}, i.e. be at least {2 * halo + 1}")
    rows = []
    for ys, y0, y1 in _windows(h, tile, halo):
        cols = []
        for xs, x0, x1 in _windows(w, tile, halo):
            out = _encoder()(model, variables, jnp.asarray(inp[:, ys:ys + tile, xs:xs + tile]))
            cols.append(out[:, y0 - ys:y1 - ys, x0 - xs:x1 - xs])
        rows.append(jnp.concatenate(cols, axis=2))
    return jnp.concatenate(rows, axis=1)


def _sub_map(fn, sub: int, *xs):
    """`jax.lax.map` of fn over sub-chunks: each x (B, C, ...) is cut along axis 1 into
    C // sub pieces of `sub` queries; outputs are stacked along a new leading axis.
    One piece's buffers stay in the CPU's caches, which makes the passes over the
    chunk faster than whole-chunk operations that stream every buffer through memory."""
    pieces = [x.reshape(x.shape[0], -1, sub, *x.shape[2:]).swapaxes(0, 1) for x in xs]
    return jax.lax.map(lambda a: fn(*a), pieces)


def _merge(y):
    """(S, B, sub, ...) from `_sub_map` -> (B, S * sub, ...)."""
    return y.swapaxes(0, 1).reshape(y.shape[1], -1, *y.shape[3:])


def _lift_mix(m, feat, coord, cell, kvs):
    """Lifts queries and applies the first len(kvs) kernel integrals with known kv's."""
    z = m.lift(feat, coord, cell)
    for layer, kv in zip(m.kernel_integrals, kvs):
        z = layer.mix(z, kv)
    return z


@partial(jax.jit, static_argnums=(0, 8))
def _moments(model, variables, feat, coord, cell, kvs, mask, total, sub):
    """Adds the chunk's sum of k^T v of layer len(kvs) to `total` (recomputing z)."""
    def piece(c, mk):
        fn = lambda m: m.kernel_integrals[len(kvs)].moments(_lift_mix(m, feat, c, cell, kvs), mk)
        return model.apply(variables, method=fn)
    return total + _sub_map(piece, sub, coord, mask).sum(0)


@partial(jax.jit, static_argnums=(0, 7))
def _project(model, variables, inp, feat, coord, cell, kvs, sub):
    """Prediction (B, C, 3) of a chunk given every layer's kv."""
    def piece(c):
        fn = lambda m: m.project(_lift_mix(m, feat, c, cell, kvs), inp, c)
        return model.apply(variables, method=fn)
    return _merge(_sub_map(piece, sub, coord))


@partial(jax.jit, static_argnums=(0, 8))
def _one_chunk(model, variables, inp, feat, coord, cell, mask, n, sub):
    """All queries in one padded chunk: each layer's input z is kept between the passes
    (2 x chunk x width floats), so nothing is computed twice."""
    def run(fn, *xs):  # fn(module, *pieces) over sub-chunks of xs
        return _sub_map(lambda *p: model.apply(variables, *p, method=fn), sub, *xs)

    z = _merge(run(lambda m, c: m.lift(feat, c, cell), coord))
    for i in range(KERNEL_INTEGRALS):
        kv = run(lambda m, zz, mk: m.kernel_integrals[i].moments(zz, mk), z, mask).sum(0) / n
        if i + 1 < KERNEL_INTEGRALS:
            z = _merge(run(lambda m, zz: m.kernel_integrals[i].mix(zz, kv), z))
    return _merge(run(lambda m, zz, c: m.project(m.kernel_integrals[-1].mix(zz, kv), inp, c),
                      z, coord))


def _chunk_len(n: int, chunk_size: int | None) -> tuple[int, int]:
    """(queries per chunk, per sub-chunk). The chunk is chunk_size (default
    DEFAULT_CHUNK) but at most the next power of two >= n, so that small outputs are not
    padded far and sizes share compilations, rounded up to a multiple of the sub-chunk
    (SUB_CHUNK, or the chunk itself when smaller)."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk = min(int(chunk_size), 1 << max(n - 1, 0).bit_length())
    sub = min(SUB_CHUNK, chunk)
    return -(-chunk // sub) * sub, sub


def predict(model, variables, inp, coord, cell, chunk_size: int | None = None,
            tile: int = DEFAULT_TILE) -> np.ndarray:
    """The model's output at every query, exactly as one-pass ``model.apply``.

    Args:
      model, variables: an SRNO and its ``{'params': ...}``.
      inp: (B, h, w, 3) normalised LR input, [-1, 1].
      coord: (B, H, W, 2) or (B, N, 2) float32 (row, col) queries in [-1, 1]; build
        grids with `make_coord` (numpy) to match the reference bit for bit.
      cell: (B, 2) float32.
      chunk_size: queries per chunk (default `DEFAULT_CHUNK`); memory grows with it.
      tile: LR window side for encoding large inputs (see `encode`).
    Returns:
      numpy float32 array shaped like `coord` with 3 channels, normalised like `inp`
      (add 1 and halve for [0, 1]); unclamped.
    """
    inp = np.asarray(inp, np.float32)
    coord = np.asarray(coord, np.float32)
    b, n = coord.shape[0], math.prod(coord.shape[1:-1])
    flat = coord.reshape(b, n, 2)
    chunk, sub = _chunk_len(n, chunk_size)
    n_chunks = -(-n // chunk)
    # Pad with copies of the last query: real coordinates, masked out of the sums.
    flat = np.concatenate([flat, np.repeat(flat[:, -1:], n_chunks * chunk - n, axis=1)], axis=1)
    mask = np.broadcast_to((np.arange(n_chunks * chunk) < n).astype(np.float32)
                           .reshape(n_chunks, 1, chunk), (n_chunks, b, chunk))
    coords = flat.reshape(b, n_chunks, chunk, 2)
    feat = encode(model, variables, inp, tile)
    inp, cell = jnp.asarray(inp), jnp.asarray(cell, jnp.float32)
    if n_chunks == 1:
        out = np.asarray(_one_chunk(model, variables, inp, feat, coords[:, 0], cell, mask[0],
                                    np.float32(n), sub))
    else:
        d = model.width // model.heads
        kvs = ()
        for _ in range(KERNEL_INTEGRALS):
            total = jnp.zeros((b, model.heads, d, d), jnp.float32)
            for i in range(n_chunks):
                total = _moments(model, variables, feat, coords[:, i], cell, kvs, mask[i],
                                 total, sub)
            kvs += (total / n,)
        out = np.empty((b, n_chunks * chunk, 3), np.float32)
        for i in range(n_chunks):
            out[:, i * chunk:(i + 1) * chunk] = _project(model, variables, inp, feat,
                                                         coords[:, i], cell, kvs, sub)
    return out[:, :n].reshape(*coord.shape[:-1], 3)
