"""The kernel integral's per-head LayerNorms and k^T v in one Pallas kernel, for GPUs.

XLA runs `GalerkinAttention.moments` as separate passes over (B, N, width) tensors: the
projections' bias, the LayerNorm of k, that of v, their transposes for the per-head
products, and as many again for the gradient. Here one Triton program per (image, head)
reads that head's k and v columns of the joint projection once, adds the bias, normalises
them in registers and accumulates k^T v; the gradient kernel reads them once more and
writes the projection's gradient and each image's sums for the parameters' gradients.
Elsewhere (`interpret=True`, the CPU) the same kernels run as plain JAX, which is how the
tests check them against the unfused path.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

try:  # deprecated from JAX 0.11, its removal announced: then the unfused formula runs
    from jax.experimental.pallas import triton as pltriton
except ImportError:
    pltriton = None

from srno_jax.errors import first_line

TILE = 256  # query points per loop step of a program
MIN_SIDE = 16  # the smallest side of a tensor-core product


def tile_for(n: int) -> int | None:
    """The loop's step for N query points: the largest power of two up to TILE and N
    dividing N (Triton's tensors have power-of-two sides), or None below MIN_SIDE."""
    tile = TILE
    while tile >= MIN_SIDE:
        if tile <= n and n % tile == 0:
            return tile
        tile //= 2
    return None


def supports(n: int, d: int) -> bool:
    """Whether the kernels take N query points and heads of d channels: a `tile_for` N,
    and d a power of two of at least MIN_SIDE (the sides of their (d, d) products), in
    a JAX that has Pallas's Triton backend."""
    shapes = tile_for(n) is not None and d >= MIN_SIDE and d & (d - 1) == 0
    return shapes and pltriton is not None


def normalise(x, scale, bias, eps):
    """The reference's LayerNorm over the last axis of x, whose mean there is already 0:
    x / (unbiased std + eps) * scale + bias, all float32. -> (that, x / (std + eps), std).
    `HeadLayerNorm` and the kernels share it."""
    std = jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) / (x.shape[-1] - 1))
    unit = x / (std + eps)
    return unit * scale + bias, unit, std


def _load(x_ref, rows, part, shift, dtype):
    """Part 0 (k) or 1 (v) of the projection at `rows` plus its bias, rounded to the
    compute dtype as the unfused sum is, in float32: (T, d)."""
    x = x_ref[rows, part, :].astype(jnp.float32) + shift
    return x.astype(dtype).astype(jnp.float32)


def _forward_kernel(x_ref, *refs, eps, tile):
    *param_refs, kv_ref = refs
    ks, kg, kb, vs, vg, vb = (r[...] for r in param_refs)
    dtype = x_ref.dtype

    def step(i, kv):
        rows = pl.ds(pl.multiple_of(i * tile, tile), tile)
        k, _, _ = normalise(_load(x_ref, rows, 0, ks, dtype), kg, kb, eps)
        v, _, _ = normalise(_load(x_ref, rows, 1, vs, dtype), vg, vb, eps)
        # Rounded to the compute dtype as the unfused LayerNorm's output is.
        k, v = k.astype(dtype), v.astype(dtype)
        return kv + jax.lax.dot_general(
            k, v, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    kv_ref[...] = jax.lax.fori_loop(
        0, x_ref.shape[0] // tile, step, jnp.zeros(kv_ref.shape, jnp.float32)
    )


def _normalise_grad(x, unit, std, scale, dy, eps):
    """The input gradient of `normalise` at dy (T, d), all float32."""
    du = dy * scale
    c = jnp.sum(du * unit, -1, keepdims=True)
    return (du - x * (c / ((x.shape[-1] - 1) * std))) / (std + eps)


def _backward_kernel(x_ref, *refs, eps, tile):
    *param_refs, g_ref, dx_ref = refs[:8]
    sum_refs = refs[8:]
    ks, kg, kb, vs, vg, vb = (r[...] for r in param_refs)
    g = g_ref[...]
    dtype = x_ref.dtype
    rounded = lambda a: a.astype(dtype).astype(jnp.float32)

    def step(i, sums):
        rows = pl.ds(pl.multiple_of(i * tile, tile), tile)
        xk, xv = _load(x_ref, rows, 0, ks, dtype), _load(x_ref, rows, 1, vs, dtype)
        k, uk, stdk = normalise(xk, kg, kb, eps)
        v, uv, stdv = normalise(xv, vg, vb, eps)
        # kv = k^T v: d k = v g^T and d v = k g, rounded to the compute dtype as the
        # cotangents of the rounded k and v are.
        k, v = rounded(k), rounded(v)
        along = lambda g_axis: (((1,), (g_axis,)), ((), ()))
        dk = rounded(jax.lax.dot_general(v, g, along(1), preferred_element_type=jnp.float32))
        dv = rounded(jax.lax.dot_general(k, g, along(0), preferred_element_type=jnp.float32))
        dxk = rounded(_normalise_grad(xk, uk, stdk, kg, dk, eps))
        dxv = rounded(_normalise_grad(xv, uv, stdv, vg, dv, eps))
        dx_ref[rows, 0, :] = dxk.astype(dx_ref.dtype)
        dx_ref[rows, 1, :] = dxv.astype(dx_ref.dtype)
        col = lambda a: jnp.sum(a, 0, keepdims=True)
        terms = (dxk, dk * uk, dk, dxv, dv * uv, dv)
        return tuple(s + col(t) for s, t in zip(sums, terms))

    zeros = jnp.zeros(sum_refs[0].shape, jnp.float32)
    sums = jax.lax.fori_loop(0, x_ref.shape[0] // tile, step, (zeros,) * len(sum_refs))
    for ref, value in zip(sum_refs, sums):
        ref[...] = value


def _columns(x):
    """The block of program (h, b): the (N, 2, d) k and v columns of head h of image b in
    x (B, N, heads, 2, d), 2 d contiguous values a point."""
    _, n, _, _, d = x.shape
    return pl.BlockSpec((None, n, None, 2, d), lambda h, b: (b, 0, h, 0, 0))


def _square(d):
    """The block of program (h, b) in a (B, heads, d, d) array."""
    return pl.BlockSpec((None, None, d, d), lambda h, b: (b, h, 0, 0))


def _call(kernel, x, params, extra, out_shape, out_specs, interpret, eps, warps):
    """`kernel` over programs (h, b), each seeing `_columns` of x, that head's (1, d) row
    of each parameter, and its `_square` of each `extra` array. The heads of an image are
    neighbours in the grid's fastest axis, so programs that run together read neighbouring
    columns of the same points."""
    b, n, heads, _, d = x.shape
    rows = [p.astype(jnp.float32).reshape(heads, 1, d) for p in params]
    in_specs = [_columns(x)]
    in_specs += [pl.BlockSpec((None, 1, d), lambda h, b: (h, 0, 0))] * len(rows)
    in_specs += [_square(d)] * len(extra)
    return pl.pallas_call(
        functools.partial(kernel, eps=eps, tile=tile_for(n)),
        out_shape=out_shape,
        grid=(heads, b),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=pltriton and pltriton.CompilerParams(num_warps=warps, num_stages=2),
    )(x, *rows, *extra)


def _per_device(fn, mesh, batch_args: int, other_args: int, outs: int):
    """fn over each device's images when `mesh` has several devices: its first
    `batch_args` arguments and its `outs` results are split along their first axis over
    every axis of the mesh, the `other_args` after them replicated. Inside a jitted step
    over that mesh, XLA would otherwise gather the whole batch onto every device to run a
    custom call it cannot split."""
    if mesh is None or mesh.size == 1:
        return fn
    batch, whole = P(mesh.axis_names), P()
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(batch,) * batch_args + (whole,) * other_args,
        out_specs=batch if outs == 1 else (batch,) * outs,
        check_vma=False,
    )


def _forward(x, params, eps, interpret, mesh):
    def run(x, *params):
        b, _, heads, _, d = x.shape
        out = jax.ShapeDtypeStruct((b, heads, d, d), jnp.float32)
        return _call(_forward_kernel, x, params, (), out, _square(d), interpret, eps, 4)

    return _per_device(run, mesh, 1, len(params), 1)(x, *params)


def _backward(x, params, g, eps, interpret, mesh):
    def run(x, g, *params):
        b, _, heads, _, d = x.shape
        partial = jax.ShapeDtypeStruct((b, heads, 1, d), jnp.float32)
        partial_spec = pl.BlockSpec((None, None, 1, d), lambda h, b: (b, h, 0, 0))
        return _call(
            _backward_kernel,
            x,
            params,
            (g,),
            (jax.ShapeDtypeStruct(x.shape, x.dtype),) + (partial,) * len(params),
            [_columns(x)] + [partial_spec] * len(params),
            interpret,
            eps,
            # About a dozen (TILE, d) float32 tensors are live in a step: 8 warps keep
            # them in registers where 4 would spill.
            8,
        )

    dx, *sums = _per_device(run, mesh, 2, len(params), 1 + len(params))(x, g, *params)
    # Each image's sums of the parameter gradients, added over the batch here.
    heads, d = params[0].shape
    return dx, [s.sum(0).reshape(heads, d).astype(p.dtype) for s, p in zip(sums, params)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def head_moments(x, k_shift, k_scale, k_bias, v_shift, v_scale, v_bias, eps, interpret, mesh):
    """Sum over the points of k^T v per head, k and v HeadLayerNorm'd from projections.

    Args:
      x: (B, N, heads, 2, d) the k (0) and v (1) projections without their bias, in the
        compute dtype; `supports(N, d)` must hold.
      k_shift, v_shift: (heads, d) the projections' bias; with it, the mean over d of
        each head's k and v must be 0 (`GalerkinAttention` centres the projection).
      k_scale, k_bias, v_scale, v_bias: (heads, d) LayerNorm parameters.
      eps: added to the std.
      interpret: run the kernels as plain JAX (on a CPU) instead of through Triton.
      mesh: None, or the device mesh a jitted caller splits the batch over (along all its
        axes): each device then runs the kernels on its own images.
    Returns:
      (B, heads, d, d) float32: the unfused `einsum('bnhd,bnhe->bhde', LN(xk + k_shift),
      LN(xv + v_shift))`, each sum and LayerNorm output rounded to the compute dtype as
      there, up to the order of the sum over points. The gradient differs from XLA's
      autodiff of that formula only in the order of its sums, and in the shifts'
      gradients of a bfloat16 x, which it sums over the points in float32 (XLA: in
      bfloat16).
    """
    params = (k_shift, k_scale, k_bias, v_shift, v_scale, v_bias)
    return _forward(x, params, eps, interpret, mesh)


def _head_moments_fwd(x, *args):
    *params, eps, interpret, mesh = args
    return _forward(x, params, eps, interpret, mesh), (x, params)


def _head_moments_bwd(eps, interpret, mesh, residuals, g):
    x, params = residuals
    dx, grads = _backward(x, params, g, eps, interpret, mesh)
    return (dx, *grads)


head_moments.defvjp(_head_moments_fwd, _head_moments_bwd)


@functools.cache
def works_here(dtype="float32", n: int = 128, d: int = 16) -> bool:
    """Whether the Triton kernels compile and run on this machine's default device as
    training would run them (compute `dtype`, N points, heads of d: the same loop step and
    block shapes, at 2 images of 2 heads), giving what their interpreted bodies give:
    the moments and all seven gradients.

    Tried once per configuration and process. A GPU or JAX version that Pallas's Triton
    backend does not support then fails here, with a warning, rather than in the step.
    """
    n = 2 * tile_for(n)  # two loop steps of the training tile
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (2, n, 2, 2, d))
    x = (x - x.mean(-1, keepdims=True)).astype(dtype)

    def part(k1, k2, k3):  # a projection's shift (mean 0) and a LayerNorm away from 1, 0
        shift = 0.1 * jax.random.normal(k1, (2, d))
        shift = (shift - shift.mean(-1, keepdims=True)).astype(dtype)
        return shift, 1 + 0.1 * jax.random.normal(k2, (2, d)), 0.1 * jax.random.normal(k3, (2, d))

    params = (*part(*keys[1:4]), *part(*keys[4:7]))
    weights = jax.random.normal(keys[7], (2, 2, d, d))

    def run(interpret):
        loss = lambda *a: jnp.sum(head_moments(*a, 1e-5, interpret, None) * weights)
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))(x, *params)
        return (value, *grads)

    try:
        got, want = run(False), run(True)
        # TF32 products on the GPU against float32 ones, and a bfloat16 rounding that can
        # fall the other way: agreement to 1e-2 of each result's largest value.
        worst = max(
            float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
            / max(float(jnp.abs(b.astype(jnp.float32)).max()), 1e-30)
            for a, b in zip(got, want)
        )
        if worst <= 1e-2:
            return True
        reason = f"their results differ from the interpreted kernels' by {worst:.1e}"
    except Exception as e:  # any failure to lower, compile or run means: not here
        reason = first_line(e)
    logging.getLogger("srno_jax").warning(
        "the kernel integrals' Pallas kernels do not run on %s (%s); using XLA's unfused "
        "formula (--config.fused_kernels=false skips this check)",
        jax.devices()[0].device_kind,
        reason[:200],
    )
    return False
