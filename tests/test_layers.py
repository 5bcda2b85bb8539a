"""`layers.conv`: its own gradient rule must give the numbers of a plain 'same' convolution."""

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
