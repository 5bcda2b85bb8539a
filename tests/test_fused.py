"""The Pallas kernel of the kernel integrals (`models.fused`) against the unfused path.

On the CPU the kernels run in Pallas's interpret mode (the same kernel bodies as plain
JAX); that they also lower to Triton for a GPU is checked by lowering them for CUDA here.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srno_jax import train
from srno_jax.models import fused, init_variables, make_model

EPS = 1e-5


def unfused(x, k_shift, k_scale, k_bias, v_shift, v_scale, v_bias):
    """`GalerkinAttention.moments`'s unfused formula on the joint projection x."""

    def norm(x, shift, scale, bias):
        x32 = (x + shift).astype(jnp.float32)
        std = jnp.sqrt(jnp.sum(x32 * x32, -1, keepdims=True) / (x.shape[-1] - 1))
        return (x32 / (std + EPS) * scale + bias).astype(x.dtype)

    k, v = (
        norm(x[..., 0, :], k_shift, k_scale, k_bias),
        norm(x[..., 1, :], v_shift, v_scale, v_bias),
    )
    return jnp.einsum("bnhd,bnhe->bhde", k, v, preferred_element_type=jnp.float32)


def inputs(n, dtype, b=2, heads=3, d=16, seed=0):
    """A joint projection whose k and v (with their shift) have mean 0 per head, and
    LayerNorm parameters away from their initial values."""
    keys = jax.random.split(jax.random.key(seed), 8)
    shift = [0.3 * jax.random.normal(keys[i], (heads, d)) for i in (0, 1)]
    # The projection's bias in the compute dtype, as GalerkinAttention passes it.
    shift = [(s - s.mean(-1, keepdims=True)).astype(dtype) for s in shift]
    x = jax.random.normal(keys[2], (b, n, heads, 2, d))
    x = (x - x.mean(-1, keepdims=True)).astype(dtype)
    scale = [1 + 0.2 * jax.random.normal(keys[i], (heads, d)) for i in (3, 4)]
    bias = [0.2 * jax.random.normal(keys[i], (heads, d)) for i in (5, 6)]
    weights = jax.random.normal(keys[7], (b, heads, d, d))
    return x, (shift[0], scale[0], bias[0], shift[1], scale[1], bias[1]), weights


def kernel(*args):
    return fused.head_moments(*args, EPS, True, None)


def grads(f, x, params, weights):
    loss = lambda *a: jnp.sum(f(*a) * weights)
    return jax.grad(loss, argnums=tuple(range(7)))(x, *params)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("n", [96, 512])  # loop steps of 32 and of TILE
def test_kernel_equals_the_unfused_moments_and_gradients_in_float32(n):
    x, params, weights = inputs(n, jnp.float32)
    assert rel(kernel(x, *params), unfused(x, *params)) < 1e-6
    for i, (got, want) in enumerate(
        zip(grads(kernel, x, params, weights), grads(unfused, x, params, weights))
    ):
        assert got.dtype == want.dtype, i
        assert rel(got, want) < 1e-5, f"gradient {i} off by {rel(got, want):.1e}"


def test_kernel_rounds_like_the_unfused_path_in_bfloat16():
    """Each sum and LayerNorm output is rounded to bfloat16 where the unfused path rounds
    it, so the two differ only where a sum taken in another order rounds the other way."""
    x, params, weights = inputs(64, jnp.bfloat16)
    assert rel(kernel(x, *params), unfused(x, *params)) < 1e-6
    got, want = grads(kernel, x, params, weights), grads(unfused, x, params, weights)
    assert got[0].dtype == jnp.bfloat16
    # The projection's gradient: at most a few elements one bfloat16 step apart.
    step = np.abs(np.asarray(want[0], np.float32)) * 2.0**-7
    assert (
        np.mean(np.abs(np.asarray(got[0], np.float32) - np.asarray(want[0], np.float32)) > step)
        < 0.01
    )
    # The LayerNorms' scale and bias gradients: float32 sums of the same terms.
    for i in (2, 3, 5, 6):
        assert rel(got[i], want[i]) < 1e-5, f"gradient {i} off by {rel(got[i], want[i]):.1e}"
    # The shifts' (bfloat16) gradients: the kernel sums them in float32, XLA in bfloat16;
    # the kernel's is the closer to float32's.
    x32 = x.astype(jnp.float32)
    p32 = [p.astype(jnp.float32) for p in params]
    exact = grads(unfused, x32, p32, weights)
    for i in (1, 4):
        assert rel(got[i], want[i]) < 2e-2, f"gradient {i} off by {rel(got[i], want[i]):.1e}"
        assert rel(got[i], exact[i]) <= rel(want[i], exact[i]), i


def test_tile_for_and_supports(monkeypatch):
    assert fused.tile_for(128 * 128) == fused.TILE
    assert fused.tile_for(48 * 48) == 256
    assert fused.tile_for(96) == 32
    assert fused.tile_for(3000) is None  # 8 | 3000: too small a product for tensor cores
    assert fused.tile_for(7) is None
    assert fused.tile_for(0) is None  # no points: no step (0 is divisible by every tile)
    assert fused.supports(128 * 128, 16) and fused.supports(96, 32)
    assert not fused.supports(128 * 128, 12)  # Triton's tensors have power-of-two sides
    assert not fused.supports(128 * 128, 8)  # a (d, d) product below tensor-core size
    assert not fused.supports(3000, 16)
    monkeypatch.setattr(fused, "pltriton", None)  # a JAX without Pallas's Triton backend
    assert not fused.supports(128 * 128, 16)
    x, params, _ = inputs(32, jnp.float32)  # the interpreted kernels still run (tests)
    assert rel(kernel(x, *params), unfused(x, *params)) < 1e-6


def test_kernel_with_heads_of_32():
    x, params, weights = inputs(64, jnp.float32, heads=2, d=32)
    assert rel(kernel(x, *params), unfused(x, *params)) < 1e-6


def small_models(dtype):
    kw = dict(encoder_args=dict(n_resblocks=1, n_feats=8), width=32, heads=2, dtype=dtype)
    return make_model("edsr-baseline", **kw), make_model("edsr-baseline", fused=True, **kw)


def batch(queries=64, seed=0):
    rng = np.random.default_rng(seed)
    u = lambda *s: jnp.asarray(rng.uniform(-1, 1, s), jnp.float32)
    return u(2, 8, 8, 3), u(2, queries, 2), jnp.full((2, 2), 0.1, jnp.float32), u(2, queries, 3)


def loss_and_grads(model, params, data):
    inp, coord, cell, gt = data
    loss = lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, inp, coord, cell) - gt))
    return jax.value_and_grad(loss)(params)


def test_fused_model_trains_like_the_unfused_one_in_float32():
    plain, with_kernel = small_models("float32")
    params = init_variables(plain, 0)["params"]
    (l0, g0), (l1, g1) = (loss_and_grads(m, params, batch()) for m in (plain, with_kernel))
    assert abs(float(l0) - float(l1)) < 1e-6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        assert rel(a, b) < 1e-5, jax.tree_util.keystr(path)


def test_fused_model_in_bfloat16_is_as_close_to_float32_as_the_unfused_one():
    plain32, _ = small_models("float32")
    plain, with_kernel = small_models("bfloat16")
    params = init_variables(plain32, 0)["params"]
    data = batch()
    _, exact = loss_and_grads(plain32, params, data)
    _, g0 = loss_and_grads(plain, params, data)
    _, g1 = loss_and_grads(with_kernel, params, data)
    worst = lambda g: max(rel(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(exact)))
    assert worst(g1) < 1.5 * worst(g0) + 1e-3


def test_masked_or_unsupported_moments_take_the_unfused_path():
    """Inference's masked chunks, query counts without a tile and heads whose size is not
    a power of two use XLA's formula: the fused model gives the same prediction there."""
    plain, with_kernel = small_models("float32")
    variables = init_variables(plain, 0)
    inp, coord, cell, _ = batch(queries=50)
    np.testing.assert_array_equal(
        with_kernel.apply(variables, inp, coord, cell), plain.apply(variables, inp, coord, cell)
    )
    kw = dict(encoder_args=dict(n_resblocks=1, n_feats=8), width=48, heads=4)  # d = 12
    plain12, fused12 = (
        make_model("edsr-baseline", **kw),
        make_model("edsr-baseline", fused=True, **kw),
    )
    inp, coord, cell, _ = batch(queries=64)
    v12 = init_variables(plain12, 0)
    np.testing.assert_array_equal(
        fused12.apply(v12, inp, coord, cell), plain12.apply(v12, inp, coord, cell)
    )
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 32)), jnp.float32)
    mask = jnp.ones((2, 64)).at[:, 40:].set(0)
    layer = lambda m: lambda mod, z, mk: mod.kernel_integrals[0].moments(z, mk)
    got = with_kernel.apply(variables, z, mask, method=layer(with_kernel))
    want = plain.apply(variables, z, mask, method=layer(plain))
    np.testing.assert_array_equal(got, want)


EIGHT_DEVICES = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from srno_jax import sharding, train
from srno_jax.models import init_variables, make_model

mesh = sharding.make_mesh()
assert mesh.size == 8
rng = np.random.default_rng(0)
u = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)
batch = {"inp": u(16, 8, 8, 3), "coord": u(16, 64, 2), "cell": np.full((16, 2), 0.1, np.float32),
         "gt": u(16, 64, 3)}
kw = dict(encoder_args=dict(n_resblocks=1, n_feats=8), width=32, heads=2)
plain = make_model("edsr-baseline", **kw)
params = init_variables(plain, 0)["params"]
want = jax.jit(jax.grad(train.l1_loss), static_argnums=1)(params, plain, batch)
model = make_model("edsr-baseline", fused=True, mesh=mesh, **kw)
grad = jax.jit(
    jax.grad(train.l1_loss),
    static_argnums=1,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
)
data = sharding.to_global(batch, mesh)
got = grad(params, model, data)
gathers = grad.lower(params, model, data).compile().as_text().count("all-gather")
worst = max(
    float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
)
print(worst, gathers)
"""


def test_fused_gradients_on_eight_devices_equal_the_unfused_ones_on_one():
    """On a mesh of 8 (fake CPU) devices, 2 images each, every device runs the kernel on
    its own images, and the sharded jitted gradient equals the unfused one computed on a
    single device: the parameters' gradients are summed across devices, and nothing
    gathers the batch."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    worst, gathers = p.stdout.split()[-2:]
    assert float(worst) < 1e-5 and int(gathers) == 0, (worst, gathers)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_to_triton_for_a_gpu(dtype):
    """The paper's shapes (16 heads of 16, 128 x 128 queries) lower to Triton IR through
    Pallas's Triton backend, forward and gradient, without a GPU: block shapes and
    operations that Pallas's lowering refuses fail here. Triton's own compile to PTX runs
    inside XLA (`benchmarks/gpu_estimate.py` runs it without a GPU)."""
    x, params, weights = inputs(128 * 128, dtype, b=1, heads=16)

    def step(x, params):
        f = lambda x, p: jnp.sum(fused.head_moments(x, *p, EPS, False, None) * weights)
        return jax.grad(f, argnums=(0, 1))(x, params)

    try:
        lowered = jax.jit(step).trace(x, params).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if "No supported GPU devices" not in str(e):
            raise
        pytest.skip(f"this JAX lowers Pallas for Triton only beside a GPU: {e}")
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2  # forward and gradient


def test_works_here_warns_and_declines_where_the_kernels_do_not_run(caplog):
    """On the CPU Pallas refuses to compile for Triton: the probe says no, in a warning
    that names the device, the reason and the setting that skips it."""
    fused.works_here.cache_clear()
    assert fused.works_here("bfloat16", 128 * 128, 16) is False
    (record,) = [r for r in caplog.records if "Pallas kernels do not run" in r.getMessage()]
    message = record.getMessage()
    assert "cpu" in message and "interpret" in message and "fused_kernels=false" in message


@pytest.mark.parametrize(
    "backend,works,expected", [("cpu", True, False), ("gpu", True, True), ("gpu", False, False)]
)
def test_training_uses_the_kernel_on_gpus_where_it_works(monkeypatch, backend, works, expected):
    from configs import demo

    probes = []
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(fused, "works_here", lambda *a: probes.append(a) or works)
    config = demo.get_config()
    assert train.model_from_config(config).fused is expected
    d = config.model.width // config.model.heads
    assert probes == ([(config.compute_dtype, config.data.sample_q, d)] if backend == "gpu" else [])
    config.model.width, config.model.heads = 48, 4  # heads of 12: no probe, no kernel
    probes.clear()
    assert train.model_from_config(config).fused is False and probes == []
    config = demo.get_config()
    config.fused_kernels = False
    assert train.model_from_config(config).fused is False
    config = demo.get_config()
    config.data.sample_q = 0  # the whole crop: the probe runs at its inp_size^2 points
    probes.clear()
    train.model_from_config(config)
    assert probes == (
        [(config.compute_dtype, config.data.inp_size**2, d)] if backend == "gpu" else []
    )
