"""The XLA options SRNO compiles with, chosen in one place and by measurement.

On XLA:CPU (jaxlib 0.10) convolutions and their gradients run through XLA's own
emitters at 30-90 GFLOP/s on a 2-core AVX-512 machine; routed through YNNPACK they ran
about 2x faster (EDSR-baseline's forward and backward on 4 x 48 x 48: 0.98 s -> 0.46 s).
The operator's inference passes ran about 6% slower with it, so only jitted functions
dominated by convolutions ask for it (README, "Benchmarks").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def conv_options() -> dict:
    """`compiler_options` for `jax.jit` of a convolution-heavy function.

    YNNPACK for dots and convolutions when the default backend is the CPU and this
    jaxlib knows the option (it is experimental; without it we fall back to XLA's
    default); {} on GPU and TPU. Call it after `jax.distributed.initialize`, since it
    initialises the backend.
    """
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.matmul, compiler_options=_CPU_CONV_OPTIONS).lower(
            jnp.ones((2, 2)), jnp.ones((2, 2))).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return dict(_CPU_CONV_OPTIONS)
