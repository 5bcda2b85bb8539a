"""Layers initialised like PyTorch's, so a model trained from scratch starts as the reference."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch's default for Conv2d weights: kaiming_uniform(a=sqrt(5)) = U(+-sqrt(1 / fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """torch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gelu(x):
    """The exact GELU as torch computes it: x / 2 (1 + erf(x / sqrt 2)).

    Within 1e-6 of jax.nn.gelu(approximate=False), which goes through erfc and runs
    about 1.6x slower on XLA:CPU.
    """
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))


@jax.custom_vjp
def relu(x):
    """max(x, 0), whose gradient (1 where the output is positive) reads the output.

    jax.nn.relu's reads the input, which then outlives the ReLU: cuDNN cannot fuse the
    ReLU into the convolution before it, and each block writes and reads the
    pre-activation once more. The barrier stops XLA from rewriting `relu(x) > 0` back
    into `x > 0`. Values and gradients equal jax.nn.relu's, bit for bit.
    """
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = relu(x)
    return y, jax.lax.optimization_barrier(y)


relu.defvjp(_relu_fwd, lambda y, g: (jnp.where(y > 0, g, jnp.zeros_like(g)),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_same(x, kernel, dimension_numbers, precision):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=dimension_numbers, precision=precision
    )


def _conv_same_fwd(x, kernel, dimension_numbers, precision):
    return _conv_same(x, kernel, dimension_numbers, precision), (x, kernel)


def _conv_same_bwd(dimension_numbers, precision, residuals, g):
    x, kernel = residuals
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        dimension_numbers=dimension_numbers,
        precision=precision,
    )
    (dx,) = jax.linear_transpose(lambda x: conv(x, kernel, padding="SAME"), x)(g)
    if jax.default_backend() != "cpu":
        (dk,) = jax.linear_transpose(lambda k: conv(x, k, padding="SAME"), kernel)(g)
        return dx, dk
    # XLA:CPU computes the kernel gradient of a padded convolution 30% slower than that
    # of an unpadded one on the padded input (7.0 vs 5.0 ms for 64 channels at 4 x 48 x
    # 48): the same sums, the padding done once by a copy.
    h, w = kernel.shape[:2]
    padded = jnp.pad(x, ((0, 0), ((h - 1) // 2, h // 2), ((w - 1) // 2, w // 2), (0, 0)))
    (dk,) = jax.linear_transpose(lambda k: conv(padded, k, padding="VALID"), kernel)(g)
    return dx, dk


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv_same(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """`lax.conv_general_dilated` for `nn.Conv`'s NHWC / HWIO 'same' convolutions at
    stride 1, with the kernel gradient of `_conv_same_bwd`; anything else is refused."""
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (tuple(window_strides), lhs_dilation or (1, 1), rhs_dilation or (1, 1))
    if padding != "SAME" or plain != ((1, 1),) * 3 or feature_group_count != 1:
        raise ValueError("conv_same: only stride-1 'SAME' convolutions without dilation")
    if jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        raise ValueError(f"conv_same: NHWC / HWIO only, got {dimension_numbers}")
    return _conv_same(lhs, rhs, nhwc, precision)


def conv(
    features: int, kernel: int, fan_in_channels: int, name: str | None = None, dtype=jnp.float32
) -> nn.Conv:
    """A stride-1, 'same'-padded kernel x kernel convolution with torch's init (NHWC)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        name=name,
        dtype=dtype,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in_channels * kernel * kernel),
        conv_general_dilated=conv_same if kernel > 1 else None,
    )


def dense(features: int, fan_in: int, name: str | None = None, dtype=jnp.float32) -> nn.Dense:
    """A 1x1 convolution of the reference, as a Dense layer over the last axis."""
    return nn.Dense(
        features,
        name=name,
        dtype=dtype,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in),
    )


class LinearParams(nn.Module):
    """The kernel (in, out) and bias of a 1x1 layer, for callers that fold it into others."""

    features: int
    fan_in: int

    @nn.compact
    def __call__(self):
        return (
            self.param("kernel", torch_kernel_init, (self.fan_in, self.features)),
            self.param("bias", torch_bias_init(self.fan_in), (self.features,)),
        )
