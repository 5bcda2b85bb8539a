"""`layers`: the convolution's own gradient rule, ReLU, GELU and the per-head LayerNorm against their plain forms."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srno_jax.models import layers

X = jax.random.normal(jax.random.key(0), (2, 11, 9, 5))


def grads(module, variables, x=X):
    loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
    return jax.grad(loss, argnums=(0, 1))(variables, x)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_conv_gradients_equal_the_plain_convolution(backend, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    ours = layers.conv(6, 3, 5)
    variables = ours.init(jax.random.key(1), X)
    plain = nn.Conv(6, (3, 3), padding="SAME")
    np.testing.assert_allclose(ours.apply(variables, X), plain.apply(variables, X), atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(grads(ours, variables)), jax.tree.leaves(grads(plain, variables))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, valid_convs", [("cpu", 1), ("gpu", 0)])
def test_conv_kernel_gradient_is_taken_unpadded_on_cpu_only(backend, valid_convs, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    ours = layers.conv(6, 3, 5)
    variables = ours.init(jax.random.key(1), X)
    text = str(jax.make_jaxpr(lambda v: grads(ours, v))(variables))
    assert text.count("padding=((0, 0), (0, 0))") == valid_convs


def test_conv_same_refuses_what_it_does_not_implement():
    kernel = jnp.ones((3, 3, 5, 6))
    dims = jax.lax.conv_dimension_numbers(X.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="stride-1"):
        layers.conv_same(X, kernel, (2, 2), "SAME", dimension_numbers=dims)
    with pytest.raises(ValueError, match="stride-1"):
        layers.conv_same(X, kernel, (1, 1), "VALID", dimension_numbers=dims)
    nchw = jax.lax.conv_dimension_numbers(X.shape, kernel.shape, ("NCHW", "HWIO", "NCHW"))
    with pytest.raises(ValueError, match="NHWC"):
        layers.conv_same(X, kernel, (1, 1), "SAME", dimension_numbers=nchw)


def test_gelu_is_torchs_erf_form_not_the_tanh_approximation():
    x = np.linspace(-6, 6, 2001)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    got = np.asarray(layers.gelu(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, exact, atol=2e-6)
    assert np.abs(got - tanh).max() > 1e-4  # the approximation would fail the line above


def test_head_layer_norm_adds_eps_to_the_unbiased_std():
    """The reference's LayerNorm: x / (std(x, ddof=1) + eps) * scale + bias, on input whose
    per-head mean is already 0; a large eps tells eps-on-std from eps-on-variance."""
    from srno_jax.models.srno import HeadLayerNorm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32) * 0.3
    x -= x.mean(-1, keepdims=True)
    norm = HeadLayerNorm(3, 4, eps=0.1)
    params = {"scale": rng.normal(size=(3, 4)), "bias": rng.normal(size=(3, 4))}
    got = np.asarray(norm.apply({"params": params}, jnp.asarray(x)), np.float64)
    x64 = x.astype(np.float64)
    std = x64.std(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(got, x64 / (std + 0.1) * params["scale"] + params["bias"], atol=1e-5)
    on_variance = x64 / np.sqrt(std**2 + 0.1) * params["scale"] + params["bias"]
    assert np.abs(got - on_variance).max() > 1e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_equals_jax_nn_relu_and_its_gradient_keeps_only_the_output(dtype):
    x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 0.5, 3.0], dtype)
    g = jnp.arange(1, 7, dtype=dtype)
    y, vjp = jax.vjp(layers.relu, x)
    y_ref, vjp_ref = jax.vjp(jax.nn.relu, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
    under_jit = jax.jit(jax.grad(lambda x: jnp.sum(layers.relu(x) * g)))(x)
    np.testing.assert_array_equal(under_jit, vjp_ref(g)[0])
    # What cuDNN's ReLU fusion needs: the gradient holds on to the output alone.
    (residual,) = jax.tree.leaves(vjp)
    np.testing.assert_array_equal(residual, y)
