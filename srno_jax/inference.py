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
chunk, every pass walks sub-chunks of queries with a loop (`_sub_map`) that stops after
the last query: on a CPU, SUB_CHUNK of them, whose buffers stay in its caches; on a GPU
or TPU, ACCELERATOR_SUB_CHUNK, a few kernels large enough to fill the device rather
than many small launches. The lifting's 1x1 layer is applied to the LR features once
(`SRNO.lift_table`) and gathered at each query, rather than applied at every query.

Compilation: one compiled encoder serves every LR size that pads to the same
`lr_bucket` shape, and one compiled operator every LR input up to MIN_CAPACITY pixels
and every output up to the chunk size. The LR input is zero-padded and encoded with a
mask that reproduces the zero padding at its true border (`models.encoders`); the
features go to the operator flat, with the true LR size as data (`models.grid`), so
that no lookup reads the padding; the queries fill chunks of a power of two (at least
MIN_CHUNK), padded with the last query, masked out of the sums and skipped piecewise.
With the persistent compilation cache (`compiler.enable_compilation_cache`) a rerun
compiles nothing.

Large LR inputs are encoded in overlapping windows whose halo covers the encoder's
receptive field, which gives the full-image features (see `encode`).
"""

from __future__ import annotations

import math
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from srno_jax import compiler
from srno_jax.errors import ConfigError
from srno_jax.models import check_variables
from srno_jax.models.grid import lr_grid
from srno_jax.models.srno import KERNEL_INTEGRALS, check_queries

DEFAULT_CHUNK = 2**18  # queries per chunk: one chunk keeps 2 x chunk x width floats (512 MB)
MIN_CHUNK = 2**16  # the smallest chunk compiled for, so that output sizes share compilations
SUB_CHUNK = 2048  # queries per inner step of a pass on a CPU (see `_sub_map`)
ACCELERATOR_SUB_CHUNK = MIN_CHUNK  # the same on a GPU or TPU
DEFAULT_TILE = 512  # LR window side for encoding large inputs
MIN_CAPACITY = 2**15  # rows of the flat LR map (`_flat`): one size for inputs up to 181 x 181
MAX_TABLE_BYTES = 2**30  # the largest lifting table (`SRNO.lift_table`); beyond, lift per query


def lr_bucket(n: int) -> int:
    """The padded length of an LR axis of n pixels: n rounded up to 2 significant bits
    up to 128 (32, 48, 64, 96, 128: at most 50% of padding) and to 3 above (160, 192,
    224, 256, 320, ...: at most 25%). A small input encodes in about the time its
    compilation takes, so there fewer, larger buckets cost least in all."""
    q = 1 << max(n.bit_length() - (2 if n <= 128 else 3), 0)
    return -(-n // q) * q


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _flat(x, size, capacity: int):
    """(B, H', W', C) holding an h x w image at the top left, size = (h, w) traced ->
    (B, capacity, C) row-major with row stride w (`grid.lr_grid`'s layout); rows after
    h * w hold copies of other pixels and are never read."""
    p = jnp.arange(capacity)
    return x[:, jnp.minimum(p // size[1], x.shape[1] - 1), p % size[1]]


@cache
def _encoder():
    """The jitted encoder of an image padded after its bottom and right edges, given its
    true size (traced): compiled once per padded shape, with `compiler.conv_options`
    (built on first use, since choosing the options initialises the backend).
    capacity None: returns the (B, H', W', C) features; an int: returns the features and
    the input flat (`_flat`), as the operator takes them."""

    def encode_fn(model, variables, inp, size, capacity):
        h, w = inp.shape[1:3]
        mask = (jnp.arange(h)[:, None] < size[0]) & (jnp.arange(w)[None, :] < size[1])
        feat = model.apply(
            variables, inp, mask[None, :, :, None], method=lambda m, x, k: m.encode(x, k)
        )
        if capacity is None:
            return feat
        return _flat(feat, size, capacity), _flat(inp, size, capacity)

    return jax.jit(encode_fn, static_argnums=(0, 4), compiler_options=compiler.conv_options())


_flatten = jax.jit(
    lambda xs, size, capacity: [_flat(x, size, capacity) for x in xs], static_argnums=2
)


def _windows(n: int, tile: int, halo: int):
    """(window start, core start, core end) along an axis of n pixels; windows are `tile`
    long (or n when n <= tile) and each core pixel lies >= halo from any window edge that
    is not an image edge, where the windows' zero padding differs from the image's."""
    if n <= tile:
        return [(0, 0, n)]
    core = tile - 2 * halo
    return [(min(max(c - halo, 0), n - tile), c, min(c + core, n)) for c in range(0, n, core)]


def _encode_padded(model, variables, inp, tile: int, capacity: int | None = None):
    """`inp` (B, h, w, 3) and its encoder features, both zero-padded after the image to
    H' >= h, W' >= w (the image at the top left; features beyond it are not defined):
    (features (B, H', W', C), input (B, H', W', 3)); with `capacity`, both flat as
    `_flat` lays them out: (B, capacity, C), (B, capacity, 3).

    Each axis <= tile is padded to `lr_bucket` of its length (at most tile), so that
    inputs of many sizes share one compiled encoder; the encoder's mask keeps the
    features inside the image equal to the unpadded encoder's. When h or w exceeds
    `tile`, that axis is encoded in tile-long windows overlapping by the encoder's
    receptive radius, keeping each window's core (one compiled window shape); the
    result then has that axis unpadded.
    """
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile must be a positive integer, got {tile!r}")
    b, h, w, _ = inp.shape
    pad = [(0, min(lr_bucket(n), tile) - n if n <= tile else 0) for n in (h, w)]
    pad = [(0, 0), *pad, (0, 0)]
    # numpy in, numpy to the jitted encoder: jnp.asarray would compile per shape.
    inp = np.pad(np.asarray(inp, np.float32), pad)
    hp, wp = inp.shape[1:3]
    window = np.array([min(h, tile), min(w, tile)], np.int32)  # the true size in each window
    if hp <= tile and wp <= tile:
        out = _encoder()(model, variables, inp, window, capacity)
        return out if capacity else (out, inp)
    halo = model.encoder.receptive_radius
    if tile <= 2 * halo:
        raise ConfigError(
            f"encoder tile {tile} must exceed twice the encoder's receptive "
            f"radius {halo}, i.e. be at least {2 * halo + 1}"
        )
    rows = []
    for ys, y0, y1 in _windows(hp, tile, halo):
        cols = []
        for xs, x0, x1 in _windows(wp, tile, halo):
            out = _encoder()(model, variables, inp[:, ys : ys + tile, xs : xs + tile], window, None)
            cols.append(out[:, y0 - ys : y1 - ys, x0 - xs : x1 - xs])
        rows.append(jnp.concatenate(cols, axis=2))
    feat = jnp.concatenate(rows, axis=1)
    return (
        (feat, inp)
        if capacity is None
        else tuple(_flatten([feat, inp], np.array([h, w], np.int32), capacity))
    )


def encode(model, variables, inp, tile: int = DEFAULT_TILE) -> jax.Array:
    """Encoder features of `inp` (B, h, w, 3) normalised -> (B, h, w, C) float32.

    Equal to the encoder on the whole image up to float rounding, through a compiled
    encoder shared by inputs of similar size; inputs larger than `tile` are encoded in
    overlapping windows (see `_encode_padded`). Raises `ConfigError` if tile <= 2 * the
    encoder's receptive radius and the input needs windows.
    """
    h, w = inp.shape[1:3]
    return _encode_padded(model, variables, inp, tile)[0][:, :h, :w]


def _slices(xs, sub: int, i):
    """The i-th (traced) piece of `sub` queries of each x (B, C, ...), along axis 1."""
    return [jax.lax.dynamic_slice_in_dim(x, i * sub, sub, axis=1) for x in xs]


def _sub_map(fn, sub: int, count, *xs):
    """fn over the first `count` (traced) pieces of `sub` queries of each x (B, C, ...);
    fn's outputs (B, sub, ...) are written at the same places of a (B, C, ...) array,
    zeros after the last piece. Skipping the pieces that hold only padding lets one
    compiled chunk serve any number of queries up to its size; one piece's buffers stay
    in the CPU's caches, which makes a pass faster than whole-chunk operations that
    stream every buffer through memory."""
    piece = jax.eval_shape(fn, *_slices(xs, sub, 0))
    out = jnp.zeros((piece.shape[0], xs[0].shape[1], *piece.shape[2:]), piece.dtype)
    body = lambda i, o: jax.lax.dynamic_update_slice_in_dim(o, fn(*_slices(xs, sub, i)), i * sub, 1)
    return jax.lax.fori_loop(0, count, body, out)


def _sub_sum(fn, sub: int, count, *xs):
    """The sum of fn over the first `count` (traced) pieces of `sub` queries of each x."""
    piece = jax.eval_shape(fn, *_slices(xs, sub, 0))
    body = lambda i, acc: acc + fn(*_slices(xs, sub, i))
    return jax.lax.fori_loop(0, count, body, jnp.zeros(piece.shape, piece.dtype))


def _lift(m, lr, coord, cell, grid):
    """P at the queries from `lr`: the flat features (B, capacity, C), or their
    `lift_table` (B, 4 capacity, width), which saves the lifting's products per query."""
    if lr.shape[1] == 4 * grid["centres"].shape[0]:
        return m.lift_from_table(lr, coord, cell, grid)
    return m.lift(lr, coord, cell, grid)


def _lift_mix(m, lr, coord, cell, grid, kvs):
    """Lifts queries and applies the first len(kvs) kernel integrals with known kv's."""
    z = _lift(m, lr, coord, cell, grid)
    for layer, kv in zip(m.kernel_integrals, kvs):
        z = layer.mix(z, kv)
    return z


@partial(jax.jit, static_argnums=0)
def _table(model, variables, feat):
    return model.apply(variables, feat, method=lambda m, f: m.lift_table(f))


@partial(jax.jit, static_argnums=(0, 10))
def _moments(model, variables, lr, coord, cell, grid, kvs, mask, total, count, sub):
    """Adds the chunk's sum of k^T v of layer len(kvs) to `total` (recomputing z)."""

    def piece(c, mk):
        layer = len(kvs)
        fn = lambda m: m.kernel_integrals[layer].moments(_lift_mix(m, lr, c, cell, grid, kvs), mk)
        return model.apply(variables, method=fn)

    return total + _sub_sum(piece, sub, count, coord, mask)


@partial(jax.jit, static_argnums=(0, 9))
def _project(model, variables, inp, lr, coord, cell, grid, kvs, count, sub):
    """Prediction (B, C, 3) of a chunk given every layer's kv."""

    def piece(c):
        fn = lambda m: m.project(_lift_mix(m, lr, c, cell, grid, kvs), inp, c, grid)
        return model.apply(variables, method=fn)

    return _sub_map(piece, sub, count, coord)


@partial(jax.jit, static_argnums=(0, 10))
def _one_chunk(model, variables, inp, lr, coord, cell, grid, mask, n, count, sub):
    """All queries in one padded chunk: each layer's input z is kept between the passes
    (2 x chunk x width floats), so nothing is computed twice."""

    def run(fn, *xs):  # fn(module, *pieces) over the pieces of xs holding queries
        return _sub_map(lambda *p: model.apply(variables, *p, method=fn), sub, count, *xs)

    def moments(i, z):
        fn = lambda *p: model.apply(
            variables, *p, method=lambda m, zz, mk: m.kernel_integrals[i].moments(zz, mk)
        )
        return _sub_sum(fn, sub, count, z, mask) / n

    z = run(lambda m, c: _lift(m, lr, c, cell, grid), coord)
    for i in range(KERNEL_INTEGRALS):
        kv = moments(i, z)
        if i + 1 < KERNEL_INTEGRALS:
            z = run(lambda m, zz: m.kernel_integrals[i].mix(zz, kv), z)
    return run(
        lambda m, zz, c: m.project(m.kernel_integrals[-1].mix(zz, kv), inp, c, grid), z, coord
    )


def _chunk_len(n: int, chunk_size: int | None) -> tuple[int, int]:
    """(queries per chunk, per sub-chunk). The chunk is chunk_size (default
    DEFAULT_CHUNK) but at most the next power of two >= n, or MIN_CHUNK if larger, so
    that output sizes share compilations (the pieces after the last query are skipped),
    split into the fewest equal sub-chunks of at most SUB_CHUNK queries on a CPU,
    ACCELERATOR_SUB_CHUNK elsewhere, and rounded up to a multiple of them (by less than
    one query per sub-chunk, so that chunk_size bounds memory)."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    integer = isinstance(chunk_size, (int, np.integer)) and not isinstance(chunk_size, bool)
    if not integer or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk = min(int(chunk_size), max(_pow2(n), MIN_CHUNK))
    most = SUB_CHUNK if jax.default_backend() == "cpu" else ACCELERATOR_SUB_CHUNK
    pieces = -(-chunk // most)
    sub = -(-chunk // pieces)
    return pieces * sub, sub


def predict(
    model, variables, inp, coord, cell, chunk_size: int | None = None, tile: int = DEFAULT_TILE
) -> np.ndarray:
    """The model's output at every query: one-pass ``model.apply``'s to float rounding,
    for any `chunk_size` (the reference's chunked prediction changes the result).

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
    Raises:
      ConfigError for variables that are not the model's (`check_variables`) or a bad
      chunk_size or tile; DataError for inp, coord and cell that do not fit
      (`models.check_queries`).
    """
    check_variables(model, variables)
    inp, coord, cell = (x if hasattr(x, "dtype") else np.asarray(x) for x in (inp, coord, cell))
    check_queries(inp, coord, cell)
    inp = np.asarray(inp, np.float32)
    coord = np.asarray(coord, np.float32)
    b, n = coord.shape[0], math.prod(coord.shape[1:-1])
    flat = coord.reshape(b, n, 2)
    chunk, sub = _chunk_len(n, chunk_size)
    n_chunks = -(-n // chunk)
    # Pad with copies of the last query: real coordinates, masked out of the sums.
    flat = np.concatenate([flat, np.repeat(flat[:, -1:], n_chunks * chunk - n, axis=1)], axis=1)
    mask = np.broadcast_to(
        (np.arange(n_chunks * chunk) < n).astype(np.float32).reshape(n_chunks, 1, chunk),
        (n_chunks, b, chunk),
    )
    coords = flat.reshape(b, n_chunks, chunk, 2)
    # Pieces of each chunk that hold queries; the rest is skipped.
    counts = [np.int32(-(-min(chunk, n - i * chunk) // sub)) for i in range(n_chunks)]
    # The LR map goes to the operator flat (`grid.lr_grid`), its true size as data, so
    # that the operator compiles once per (capacity, chunk) and not per input size.
    h, w = inp.shape[1:3]
    capacity = max(MIN_CAPACITY, _pow2(h * w))
    lr, inp = _encode_padded(model, variables, inp, tile, capacity)
    if 4 * capacity * model.width * 4 * b <= MAX_TABLE_BYTES:
        lr = _table(model, variables, lr)
    grid, cell = lr_grid(h, w, capacity), np.asarray(cell, np.float32)
    if n_chunks == 1:
        out = np.asarray(
            _one_chunk(
                model,
                variables,
                inp,
                lr,
                coords[:, 0],
                cell,
                grid,
                mask[0],
                np.float32(n),
                counts[0],
                sub,
            )
        )
    else:
        d = model.width // model.heads
        kvs = ()
        for _ in range(KERNEL_INTEGRALS):
            total = jnp.zeros((b, model.heads, d, d), jnp.float32)
            for i in range(n_chunks):
                total = _moments(
                    model,
                    variables,
                    lr,
                    coords[:, i],
                    cell,
                    grid,
                    kvs,
                    mask[i],
                    total,
                    counts[i],
                    sub,
                )
            kvs += (total / n,)
        out = np.empty((b, n_chunks * chunk, 3), np.float32)
        for i in range(n_chunks):
            out[:, i * chunk : (i + 1) * chunk] = _project(
                model, variables, inp, lr, coords[:, i], cell, grid, kvs, counts[i], sub
            )
    return out[:, :n].reshape(*coord.shape[:-1], 3)
