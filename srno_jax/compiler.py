"""The XLA options SRNO compiles with, and how its CPU runs use host memory, chosen in
one place and by measurement.

On XLA:CPU (jaxlib 0.10) convolutions and their gradients run through XLA's own
emitters at 30-90 GFLOP/s on a 2-core AVX-512 machine; routed through YNNPACK they ran
about 2x faster (EDSR-baseline's forward and backward on 4 x 48 x 48: 0.98 s -> 0.46 s).
The operator's inference passes ran about 6% slower with it, so only jitted functions
dominated by convolutions ask for it (README, "Benchmarks"). Naming the dot fusion
replaces YNNPACK's default fusion types, so its reductions are named as well: without
them XLA rewrites each large sum (the bias and LayerNorm gradients of the training step)
into a tree of reduce-windows that ran 4x slower, 2.5% of the step. `retain_freed_memory`
keeps XLA:CPU's per-call buffers in malloc's heap for training.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp

from srno_jax.errors import ConfigError
from srno_jax.workdir import is_uri

_CPU_CONV_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def conv_options() -> dict:
    """`compiler_options` for `jax.jit` of a convolution-heavy function.

    YNNPACK for dots, convolutions and reductions when the default backend is the CPU and this
    jaxlib knows the option (it is experimental; without it we fall back to XLA's
    default); {} on GPU and TPU. Call it after `jax.distributed.initialize`, since it
    initialises the backend.
    """
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.matmul, compiler_options=_CPU_CONV_OPTIONS).lower(
            jnp.ones((2, 2)), jnp.ones((2, 2))
        ).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return dict(_CPU_CONV_OPTIONS)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def retain_freed_memory() -> bool:
    """Asks glibc's malloc to keep the memory a process frees, for reuse.

    XLA:CPU allocates the buffers of each call anew. glibc serves allocations above 128
    KiB with fresh mmaps and unmaps them when they are freed, so every training step or
    prediction page-faults its whole working set in again: on the 2-core machines of
    this project a 38 MB elementwise pass took 14.6 ms that way and 2.5 ms in reused
    memory, and the training step 10% longer. With one arena for all threads (only the
    main arena grows without mmap), mmap off and the heap trimmed only beyond 2 GiB
    free, freed buffers stay in the heap and the next call reuses them; the process
    keeps its peak memory instead of returning it between calls. The one arena makes
    XLA's compilations about 15% slower, so it pays where one function runs many times:
    main.py's training calls it (and the benchmarks of the training step), while
    eval.py and srno-upscale, which compile per size bucket, do not. Process-wide and
    best called before XLA starts its threads. True when applied; False where the C
    library has no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


DEFAULT_CACHE_DIR = "~/.cache/srno_jax/xla"


def enable_compilation_cache(cache_dir: str | None = DEFAULT_CACHE_DIR) -> str | None:
    """Turns on JAX's persistent compilation cache in `cache_dir` (None or '': off).

    A rerun of a command-line tool then loads its compiled functions instead of
    compiling them again. Every compilation is cached, however short (the tools compile
    a handful of functions, each worth keeping). Environment settings win: when
    JAX_COMPILATION_CACHE_DIR is set, that directory is used, and set empty it turns the
    cache off. Returns the directory used, or None when the cache is off. Call it before
    the first compilation.

    A local folder is made if need be and checked first, since JAX reports one it cannot
    use only as warnings at each compilation. One that was asked for (an argument other
    than the default, or the environment) raises `ConfigError` naming it and the fix; an
    unusable default (a read-only home) turns the cache off.
    """
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    path = (env if env is not None else cache_dir and os.path.expanduser(cache_dir)) or None
    if path is None:
        return None
    problem = _cache_dir_problem(path)
    if problem and env is not None:
        raise ConfigError(
            f"JAX_COMPILATION_CACHE_DIR={path} {problem}; set it to a writable folder, or "
            "to '' to turn the cache off"
        )
    if problem and cache_dir != DEFAULT_CACHE_DIR:
        raise ConfigError(
            f"--compilation_cache {path} {problem}; give a writable folder, or "
            "--compilation_cache '' to turn the cache off"
        )
    if problem:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def _cache_dir_problem(path: str) -> str | None:
    """Why the local folder `path` cannot hold the cache (made if missing), or None; a
    bucket (``gs://``) is left to JAX."""
    if is_uri(path):
        return None
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"cannot be made ({e.strerror or e})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable"
    return None


class CompileClock:
    """Time and count JAX's compilations while in the ``with`` block (`jax.monitoring`).

    Attributes: `tracing`, seconds tracing and lowering to MLIR (the persistent cache
    does not save these); `xla`, seconds in XLA compiling or loading from the
    persistent cache; `compilations`, XLA compilations requested, of which
    `cache_hits` were loaded from the persistent cache. Properties: `compile_s`, all
    these seconds; `compiled`, the compilations the cache did not serve.
    """

    TRACE_EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
    )
    XLA_EVENT = "/jax/core/compile/backend_compile_duration"  # also on a cache hit
    CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

    def __enter__(self):
        self.tracing, self.xla, self.compilations, self.cache_hits = 0.0, 0.0, 0, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event in self.TRACE_EVENTS:
            self.tracing += duration
        elif event == self.XLA_EVENT:
            self.xla += duration
            self.compilations += 1

    def _on_event(self, event: str, **kwargs) -> None:
        self.cache_hits += event == self.CACHE_HIT_EVENT

    @property
    def compile_s(self) -> float:
        return self.tracing + self.xla

    @property
    def compiled(self) -> int:
        return self.compilations - self.cache_hits
