"""The XLA options of `srno_jax.compiler`: they change speed, never the numbers."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srno_jax import compiler
from srno_jax.errors import ConfigError
from srno_jax.models import init_variables, make_model


def test_conv_options_keep_the_encoder_output():
    options = compiler.conv_options()
    assert options, "this jaxlib's XLA:CPU should accept the YNNPACK option"
    model = make_model()
    variables = init_variables(model)
    inp = jax.random.uniform(jax.random.key(0), (1, 24, 20, 3), minval=-1, maxval=1)
    fn = lambda v, x: model.apply(v, x, method=model.encode)
    plain = jax.jit(fn)(variables, inp)
    fast = jax.jit(fn, compiler_options=options)(variables, inp)
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=1e-5)
    grad = lambda opts: jax.jit(
        jax.grad(lambda v: jnp.sum(fn(v, inp) ** 2)), compiler_options=opts
    )(variables)
    for a, b in zip(jax.tree.leaves(grad(options)), jax.tree.leaves(grad({}))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_conv_options_keep_large_sums_out_of_reduce_window_trees():
    # The training step's bias and LayerNorm gradients: XLA:CPU's own tree of
    # reduce-windows ran them 4x slower than YNNPACK's reduction.
    x = jnp.ones((4, 2304, 256))
    fn = jax.jit(lambda x: x.sum((0, 1)), compiler_options=compiler.conv_options())
    assert "reduce-window" not in fn.lower(x).compile().as_text()


def test_unknown_option_falls_back_to_the_default(monkeypatch):
    monkeypatch.setattr(compiler, "_CPU_CONV_OPTIONS", {"xla_cpu_no_such_option": True})
    compiler.conv_options.cache_clear()
    try:
        assert compiler.conv_options() == {}
    finally:
        compiler.conv_options.cache_clear()


def test_compile_clock_counts_compilations():
    with compiler.CompileClock() as clock:
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()
    assert clock.compilations >= 1 and clock.compiled == clock.compilations - clock.cache_hits
    assert clock.compile_s > 0
    with compiler.CompileClock() as again:
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(7)).block_until_ready()  # a new function: compiles
        fn = jax.jit(lambda x: x - 2)
        fn(jnp.ones(3))
        before = again.compilations
        fn(jnp.ones(3))  # already compiled
    assert again.compilations == before >= 2
    jax.jit(lambda x: x / 5)(jnp.ones(2))  # after the block: not counted
    assert again.compilations == before


def test_compilation_cache_switch(tmp_path, monkeypatch):
    """The tools' cache: a folder, off with '' or None, and JAX_COMPILATION_CACHE_DIR wins
    (set empty, it turns the cache off)."""
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # decide only, change nothing
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compiler.enable_compilation_cache(str(tmp_path)) == str(tmp_path)
    assert compiler.enable_compilation_cache("") is None
    assert compiler.enable_compilation_cache(None) is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compiler.enable_compilation_cache("") == str(tmp_path / "env")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    assert compiler.enable_compilation_cache(str(tmp_path)) is None


def test_unusable_cache_folder_is_refused_up_front(tmp_path, monkeypatch):
    """A file, or a folder that cannot be made, is refused in one line naming the fix
    (JAX would warn at every compilation instead); an unusable default turns the cache off."""
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # decide only, change nothing
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ConfigError) as e:
        compiler.enable_compilation_cache(str(afile))
    assert str(e.value) == (
        f"--compilation_cache {afile} is a file, not a folder; give a writable folder, or "
        "--compilation_cache '' to turn the cache off"
    )
    with pytest.raises(ConfigError, match=r"file/xla cannot be made \(Not a directory\); give"):
        compiler.enable_compilation_cache(str(afile / "xla"))
    made = tmp_path / "new" / "xla"
    assert compiler.enable_compilation_cache(str(made)) == str(made) and made.is_dir()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(afile))
    with pytest.raises(ConfigError, match=r"^JAX_COMPILATION_CACHE_DIR=.*file is a file.*to ''"):
        compiler.enable_compilation_cache("")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("HOME", str(afile))  # a home where ~/.cache cannot be made
    assert compiler.enable_compilation_cache() is None


_PAGE_FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from srno_jax import compiler
applied = compiler.retain_freed_memory() if sys.argv[1] == "retain" else None
f = jax.jit(lambda x: jnp.tanh(x) * 2 + x)  # a 64 MB output, freed after each call
x = jnp.ones((4096, 4096))
for _ in range(10):  # freed outputs come back to malloc a few calls late
    f(x).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_retain_freed_memory_stops_the_page_faults_of_each_call():
    """Without it, every call maps its 64 MB output anew (about 16,000 page faults);
    with it, freed buffers are reused (a call that allocates no new memory, at least)."""

    def faults(mode):
        out = subprocess.run(
            [sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    assert faults("default")[1] > 8000
    # glibc hands a new thread an arena that is not locked at that moment; on a loaded
    # machine XLA's worker can get the one a thread took before retain_freed_memory, which
    # still unmaps. One fresh process of three reusing its memory shows the mechanism.
    runs = []
    while len(runs) < 3 and (not runs or runs[-1][1] >= 500):
        runs.append(faults("retain"))
    assert all(applied == "True" for applied, _ in runs) and runs[-1][1] < 500, runs
