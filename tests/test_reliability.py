"""Reliability: preemption, kill -9, divergence, bad data and bad arguments never cost a run.

Most tests run `main.py` in a subprocess with the tiny model of `test_train.tiny_config`
(through tests/tiny_main_config.py). The subprocesses share a persistent compilation
cache, so only the first one pays XLA's compile time.
"""

import asyncio.base_events
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import image_dir, jit_step, random_batch, tiny_config  # noqa: F401

from srno_jax import checkpoints, load_checkpoint, train, train_cli
from srno_jax import workdir as workdir_lib
from srno_jax.errors import ConfigError, HostError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TMP_SUFFIX = ".orbax-checkpoint-tmp"
STRAIGHT_STEPS = 60  # the uninterrupted run keeps a checkpoint of every step up to here
# lr=1e38 blows the parameters up in one step; the steps after it are non-finite.
DIVERGING = (
    "--config.total_steps=50",
    "--config.optim.lr=1e38",
    "--config.max_nonfinite_steps=3",
    "--config.checkpoint.every_steps=1",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # One cache for the modules that import this fixture too (test_multihost).
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    cache.mkdir(exist_ok=True)
    e = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        PYTHONUNBUFFERED="1",
    )
    e.pop("XLA_FLAGS", None)
    return e


def main_cmd(image_dir, workdir, *flags):
    return [
        sys.executable,
        str(ROOT / "main.py"),
        f"--config={TESTS / 'tiny_main_config.py'}:{image_dir}",
        f"--workdir={workdir}",
        *flags,
    ]


def run_main(env, image_dir, workdir, *flags, timeout=300, **extra_env):
    return subprocess.run(
        main_cmd(image_dir, workdir, *flags),
        env=dict(env, **extra_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_main(env, image_dir, workdir, *flags, **popen):
    return subprocess.Popen(
        main_cmd(image_dir, workdir, *flags),
        env=env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **popen,
    )


def wait_for_step(proc, min_step, lines, timeout=240):
    """Reads stderr into `lines` until the process logs step >= min_step; returns that step."""
    t0 = time.time()
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"step (\d+)/", line)
        if m and int(m.group(1)) >= min_step:
            return int(m.group(1))
        assert time.time() - t0 < timeout, "".join(lines)
    pytest.fail(f"process ended before step {min_step}:\n" + "".join(lines))


def finish(proc, lines, timeout=120):
    lines.append(proc.communicate(timeout=timeout)[1])
    return proc.returncode, "".join(lines)


def steps_in(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.is_dir() else []


def params_of(path):
    return load_checkpoint(path)[1]["params"]


def assert_same_params(a, b, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol),
        a,
        b,
    )


def assert_clean_error(proc, *needles):
    """A non-zero exit with a one-line `error: ...` naming each needle, and no traceback."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], proc.stderr


@pytest.fixture(scope="module")
def straight(env, image_dir, tmp_path_factory):
    """An uninterrupted run with a checkpoint at every step: the reference for any step."""
    wd = tmp_path_factory.mktemp("straight")
    p = run_main(
        env,
        image_dir,
        wd,
        f"--config.total_steps={STRAIGHT_STEPS}",
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.keep=1000",
        "--config.log_every_steps=20",
    )
    assert p.returncode == 0, p.stderr
    assert steps_in(wd) == list(range(1, STRAIGHT_STEPS + 1))
    return wd


def straight_params(straight, step):
    return params_of(Path(straight) / "checkpoints" / str(step))


# --- 1. preemption -------------------------------------------------------------------------


def test_sigterm_and_sigint_save_and_resume(env, image_dir, tmp_path, straight):
    wd = tmp_path / "run"
    long = "--config.total_steps=100000"
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, lines = start_main(env, image_dir, wd, long), []
        wait_for_step(proc, (stopped[-1] if stopped else 0) + 3, lines)
        proc.send_signal(sig)
        rc, log = finish(proc, lines)
        assert rc == 0, log
        assert "Traceback" not in log, log
        m = re.search(
            rf"stopping at step (\d+) \({sig.name}\); checkpoint saved, rerun to resume", log
        )
        assert m, log
        stopped.append(int(m.group(1)))
        assert steps_in(wd)[-1] == stopped[-1]
        if len(stopped) > 1:
            assert f"resumed from step {stopped[-2]}" in log, log
    total = stopped[-1] + 3
    assert total <= STRAIGHT_STEPS, f"stopped too late for the reference run: {stopped}"
    p = run_main(env, image_dir, wd, f"--config.total_steps={total}")
    assert p.returncode == 0 and f"resumed from step {stopped[-1]}" in p.stderr, p.stderr
    assert_same_params(params_of(wd), straight_params(straight, total))


def test_a_second_ctrl_c_stops_at_once_and_says_so(env, image_dir, tmp_path):
    """The first Ctrl-C asks for a stop at an agreed step; the user who presses it again
    gets an exit at once, without saving, in one line that says so."""
    proc, lines = start_main(env, image_dir, tmp_path / "run", "--config.total_steps=100000"), []
    wait_for_step(proc, 3, lines)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # the first is handled: two pending signals would be one
    proc.send_signal(signal.SIGINT)
    rc, log = finish(proc, lines)
    assert rc == 130, log
    assert "Traceback" not in log, log
    assert "error: SIGINT outside training (before it began, after its last save, or a " in log
    assert "second signal during it): stopped at once without saving" in log, log


def test_a_signal_to_the_process_group_stops_worker_processes_cleanly(env, image_dir, tmp_path):
    """SLURM's time limit and Ctrl-C signal every process of the job, the loader's worker
    processes too: the run must still stop at a step, save and exit 0."""
    wd = tmp_path / "run"
    flags = ("--config.total_steps=100000", "--config.data.worker_processes=true")
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc, lines = start_main(env, image_dir, wd, *flags, start_new_session=True), []
        wait_for_step(proc, steps_in(wd)[-1] + 3 if steps_in(wd) else 3, lines)
        os.killpg(proc.pid, sig)
        rc, log = finish(proc, lines)
        assert rc == 0 and "Traceback" not in log, log
        m = re.search(rf"stopping at step (\d+) \({sig.name}\); checkpoint saved", log)
        assert m and steps_in(wd)[-1] == int(m.group(1)), log


def _children(pid):
    """Process ids whose parent is `pid` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _alive(pid):
    try:  # a zombie (state Z) has exited; only its parent has not collected it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_processes_exit_when_the_main_process_is_killed(env, image_dir, tmp_path):
    """kill -9 (or the kernel's out-of-memory killer) gives the main process no chance to
    close its loader: the workers must notice and exit, not hold their memory forever."""
    flags = ("--config.total_steps=100000", "--config.data.worker_processes=true")
    proc, lines = start_main(env, image_dir, tmp_path / "run", *flags), []
    wait_for_step(proc, 2, lines)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers  # the workers (and multiprocessing's resource tracker)
    proc.kill()
    proc.wait()
    deadline = time.time() + 15
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)], "workers outlived the main process"


def test_kill9_during_async_saves_keeps_last_complete_checkpoint(
    env, image_dir, tmp_path, straight
):
    """kill -9 at random points of a run that saves (asynchronously) at every step."""
    rng = random.Random(0)
    wd, total, flags = tmp_path / "run", 24, ("--config.checkpoint.every_steps=1",)
    resumed_from, seen_tmp = 0, []
    for _ in range(3):
        proc, lines = start_main(env, image_dir, wd, f"--config.total_steps={total}", *flags), []
        wait_for_step(proc, resumed_from + rng.randint(1, 4), lines)
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        proc.wait()
        if resumed_from:
            assert f"resumed from step {resumed_from}" in "".join(lines), "".join(lines)
        names = os.listdir(wd / "checkpoints")
        seen_tmp += [n for n in names if TMP_SUFFIX in n]
        assert all(n.isdigit() or TMP_SUFFIX in n for n in names), names
        assert steps_in(wd), names
        resumed_from = steps_in(wd)[-1]
        # Every finalised step folder is complete: it restores and matches the reference.
        assert_same_params(
            params_of(wd / "checkpoints" / str(resumed_from)),
            straight_params(straight, resumed_from),
        )
        assert resumed_from < total - 2, f"the run got too far before the kill: {names}"
    # A leftover unfinished save, even of a later step, must not be taken for a checkpoint.
    for junk in (f"{total - 1}{TMP_SUFFIX}", f"{total - 2}{TMP_SUFFIX}-1234567890"):
        junk = wd / "checkpoints" / junk
        (junk / "state").mkdir(parents=True, exist_ok=True)
        (junk / "state" / "garbage").write_bytes(b"\0" * 100)
    p = run_main(env, image_dir, wd, f"--config.total_steps={total}", *flags)
    assert p.returncode == 0, p.stderr
    assert f"resumed from step {resumed_from}" in p.stderr, p.stderr
    assert steps_in(wd)[-1] == total
    assert_same_params(params_of(wd), straight_params(straight, total))


def test_orbax_saves_to_a_tmp_folder_then_renames(image_dir, tmp_path, monkeypatch):
    """The atomicity that the kill -9 test relies on: write `N.orbax-checkpoint-tmp-*`, rename."""
    from orbax.checkpoint._src.path import async_path

    renames = []
    original = async_path.rename

    async def spy(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        return await original(src, dst)

    monkeypatch.setattr(async_path, "rename", spy)
    state = train.TrainState(
        step=jnp.asarray(7, jnp.int32),
        params={"w": jnp.ones(3)},
        opt_state=(),
        nonfinite=jnp.zeros((), jnp.int32),
    )
    mngr = checkpoints.manager(tmp_path, keep=3)
    checkpoints.save(mngr, state, tiny_config(image_dir))
    mngr.wait_until_finished()
    mngr.close()
    assert any(
        re.fullmatch(rf"7{re.escape(TMP_SUFFIX)}(-\d+)?", s) and d == "7" for s, d in renames
    ), renames
    assert os.listdir(tmp_path / "checkpoints") == ["7"]


# --- 2. divergence -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_step(image_dir):
    step, state = jit_step(tiny_config(image_dir))
    return state, step


def test_single_nonfinite_step_is_skipped(tiny_step):
    state, step = tiny_step
    s1, m1 = step(state, random_batch(0, bad=True))
    assert not bool(m1["finite"]) and int(s1.nonfinite) == 1 and int(s1.step) == 1
    assert_same_params(s1.params, state.params, atol=0)
    assert_same_params(s1.opt_state, state.opt_state, atol=0)
    s2, m2 = step(s1, random_batch(1))
    assert bool(m2["finite"]) and int(s2.nonfinite) == 0 and int(s2.step) == 2
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s2.params, s1.params)
    )
    assert max(moved) > 0


def test_divergence_keeps_the_last_good_checkpoint(env, image_dir, tmp_path):
    """Four good steps, then lr=1e38: step 5 blows the parameters up (finite, ~1e38), steps
    6-8 are non-finite. Checkpoint 5 held the blown-up state, so it goes; 4 stays, named,
    with the 2 before it (checkpoint.keep = 3)."""
    wd = tmp_path / "run"
    p = run_main(env, image_dir, wd, "--config.total_steps=4", "--config.checkpoint.every_steps=1")
    assert p.returncode == 0, p.stderr
    p = run_main(env, image_dir, wd, *DIVERGING)
    assert_clean_error(
        p,
        "non-finite for 3 steps in a row, steps 6..8",
        f"the last good checkpoint, step 4, is kept in {wd}",
    )
    assert steps_in(wd) == [2, 3, 4], steps_in(wd)
    assert not [n for n in os.listdir(wd / "checkpoints") if TMP_SUFFIX in n]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params_of(wd)))
    # A rate that is infinite in float32 (3e38 x 10) makes every step non-finite from the
    # first: the checkpoint resumed from is not the cause, and retries must keep it.
    for _ in range(2):
        p = run_main(
            env,
            image_dir,
            wd,
            *DIVERGING,
            "--config.optim.lr=3e38",
            "--config.optim.warmup_mult=10",
        )
        assert_clean_error(p, "steps 5..7", f"the last good checkpoint, step 4, is kept in {wd}")
        assert steps_in(wd) == [2, 3, 4], steps_in(wd)


def test_nan_learning_rate_never_reaches_the_parameters(tiny_step):
    """A non-finite learning rate (or updated parameter) skips the step like a NaN loss."""
    state, _ = tiny_step
    config = tiny_config(".")
    config.optim.lr = float("nan")
    s1, m1 = jit_step(config)[0](state, random_batch(0))
    assert np.isfinite(float(m1["loss"])) and not bool(m1["finite"]) and int(s1.nonfinite) == 1
    assert_same_params(s1.params, state.params, atol=0)


# --- 3. and 4. bad data and arguments: one clear line before any work --------------------


@pytest.mark.parametrize(
    "flags, extra_env, needles",
    [
        (["--config.data.train=/missing/path"], {}, ["/missing/path", "neither"]),
        (
            ["--config.batch_size=12"],
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
            ["batch_size 12 is not divisible by the 8 devices", "--config.batch_size=16"],
        ),
        (["--config.modle.width=3"], {}, ["modle", 'Did you mean "model"']),
        (["--config.data.scale_min=0.5"], {}, ["scale_min", "0.5"]),
        (["--config.data.scale_min=3", "--config.data.scale_max=2"], {}, ["scale_max", "3", "2"]),
        (["--config.batch_size=0"], {}, ["batch_size = 0", "an integer >= 1"]),
        (["--config.log_every_steps=0"], {}, ["log_every_steps = 0"]),
        (["--config.checkpoint.every_steps=0"], {}, ["checkpoint.every_steps = 0"]),
        (["--config.optim.lr=nan"], {}, ["optim.lr = nan", "finite number > 0"]),
        (["--config.batch_size=8", "--config.modle.width=3"], {}, ["in --config.modle.width)"]),
        (["--config.seed=4294967296"], {}, ["seed = 4294967296", "<= 4294967295"]),
        (["--workdir="], {}, ["--workdir is empty (an unset shell variable?)"]),
    ],
    ids=[
        "missing-data",
        "batch-vs-devices",
        "unknown-key",
        "scale-min",
        "scale-max",
        "batch-zero",
        "log-every-zero",
        "checkpoint-every-zero",
        "lr-nan",
        "typo-named-alone",
        "seed-too-large",
        "empty-workdir",
    ],
)
def test_bad_arguments_fail_fast(env, image_dir, tmp_path, flags, extra_env, needles):
    t0 = time.time()
    p = run_main(env, image_dir, tmp_path / "run", *flags, timeout=120, **extra_env)
    assert_clean_error(p, *needles)
    assert "--config.batch_size=8" not in p.stderr  # only the flag that failed is blamed
    assert " device(s) of " not in p.stderr  # it stopped before training began
    assert not (tmp_path / "run" / "checkpoints").exists() or not steps_in(tmp_path / "run")
    assert time.time() - t0 < 60


@pytest.mark.parametrize("entry", ["main.py", "srno-train"])
def test_help_lists_the_training_flags(env, entry):
    """absl's --help shows the main module's flags; these are train_cli's."""
    script = Path(sys.executable).with_name("srno-train")
    if entry == "srno-train" and not script.exists():
        pytest.skip("the package is not installed with its scripts")
    cmd = [sys.executable, "main.py"] if entry == "main.py" else [str(script)]
    p = subprocess.run(
        [*cmd, "--help"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 1, p.stderr  # absl's --help ends with status 1
    for needle in ("--workdir", "--config.FIELD=VALUE", "--num_processes", "resumes"):
        assert needle in p.stdout, p.stdout


@pytest.mark.parametrize(
    "config, needles",
    [
        ("defualt", ["--config defualt is neither a config file nor a built-in config"]),
        ("broken.py", ["cannot load --config", "SyntaxError"]),
        ("empty.py", ["empty.py has no get_config()"]),
        ("demo:foo", ["get_config() takes no argument, but ':foo' gives one"]),
        ("arg.py", ["get_config(path) needs one: FILE:ARG"]),
        ("arg.py:x", ["get_config failed: ZeroDivisionError"]),
        ("nodata.py", ["the config has no field data: a config file starts from a built-in"]),
        ("notes.md", ["cannot load --config notes.md: SyntaxError"]),
        ("int.txt", ["get_config returned a int, not an ml_collections.ConfigDict"]),
    ],
)
def test_config_file_that_does_not_load(env, tmp_path, config, needles):
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "arg.py").write_text("def get_config(path):\n    return 1 / 0\n")
    (tmp_path / "notes.md").write_text("# notes\nx = (\n")  # not .py: loaded all the same
    (tmp_path / "int.txt").write_text("def get_config():\n    return 3\n")
    (tmp_path / "nodata.py").write_text(
        "from configs import default\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        "    del c['data']\n"
        "    return c\n"
    )
    cmd = [sys.executable, str(ROOT / "main.py"), f"--config={config}", "--workdir=run"]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_clean_error(p, *needles)


def test_out_of_device_memory_is_one_line(env, image_dir, tmp_path):
    """XLA's RESOURCE_EXHAUSTED (here raised by hand) names the config fields to lower."""
    script = (
        "import sys, jax\n"
        "from srno_jax import train_cli\n"
        "def run(config, workdir):\n"
        "    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating')\n"
        "train_cli.run = run\n"
        "train_cli.main(sys.argv)\n"
    )
    cmd = [sys.executable, "-c", script, *main_cmd(image_dir, tmp_path / "run")[2:]]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_clean_error(p, "out of memory", "--config.batch_size (now ")


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--config.model.width=abc", "flag --config.model.width=abc: invalid literal"),
        ("--foo=1", "Unknown command line flag 'foo'"),
    ],
)
def test_flag_value_error_is_clear(env, image_dir, tmp_path, flag, needle):
    p = run_main(env, image_dir, tmp_path / "run", flag, timeout=120)
    assert_clean_error(p, needle, "(--helpfull lists the flags)")
    assert "FATAL" not in p.stderr, p.stderr


def test_resume_of_another_architecture_is_refused(env, image_dir, straight):
    p = run_main(
        env,
        image_dir,
        straight,
        f"--config.total_steps={STRAIGHT_STEPS + 5}",
        "--config.model.width=24",
        timeout=120,
    )
    assert_clean_error(
        p,
        "holds a checkpoint of another model: model.width 16 there, 24 here",
        "resume with --config.model.width=16, or use another --workdir",
    )
    assert steps_in(straight)[-1] == STRAIGHT_STEPS


def test_unreadable_images_are_reported_and_refused_for_validation(env, image_dir, tmp_path):
    """main.py shows the loader's skips (absl sets the root logger to FATAL) and one line
    on the data; an unreadable validation image is refused at the start, since skipping
    it would change, or double an image in, the validation set."""
    train, val = tmp_path / "train", tmp_path / "val"
    for folder in (train, val):
        shutil.copytree(image_dir, folder)
        (folder / "broken.png").write_bytes(b"not an image")
    p = run_main(env, train, tmp_path / "run", f"--config.data.val={val}", timeout=120)
    assert_clean_error(p, f"data.val {val}: 1 unreadable image(s), the first image ")
    assert f"skipping unreadable image {train / 'broken.png'}" in p.stderr
    assert f"training data: 4 images from {train}; 1 unreadable, skipped" in p.stderr


def test_workdir_that_is_a_file_or_unwritable(env, image_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert_clean_error(run_main(env, image_dir, afile, timeout=120), "is a file, not a folder")
    # Root ignores permission bits, so use a folder under a read-only file system.
    assert_clean_error(run_main(env, image_dir, "/proc/srno-run", timeout=120), "not writable")


@pytest.mark.parametrize("name", workdir_lib.SUBFOLDERS)
def test_a_file_where_a_run_keeps_a_folder_is_refused(tmp_path, name):
    (tmp_path / name).write_text("")
    with pytest.raises(ConfigError, match=f"{name} is a file, but a run keeps its {name}"):
        workdir_lib.check_writable(tmp_path)


def test_a_tensorboard_log_that_cannot_open_ends_the_run_in_one_line(
    image_dir, tmp_path, monkeypatch
):
    """Process 0 alone opens it: a failure there must end every host, not hang them."""

    def fails(workdir, start):
        raise OSError("no space left on device")

    monkeypatch.setattr(train, "MetricWriter", fails)
    with pytest.raises(HostError, match="opening the TensorBoard log failed at step 0: OSError"):
        train_cli.run(tiny_config(image_dir, total_steps=2), tmp_path / "run")


def test_second_run_on_a_workdir_is_refused_and_a_dead_ones_lock_taken_over(
    env, image_dir, tmp_path
):
    wd = tmp_path / "run"
    proc, lines = (
        start_main(
            env, image_dir, wd, "--config.total_steps=100000", "--config.checkpoint.every_steps=1"
        ),
        [],
    )
    wait_for_step(proc, 2, lines)
    p = run_main(env, image_dir, wd, "--config.total_steps=3", timeout=120)
    assert_clean_error(p, f"is in use by process {proc.pid}", "LOCK")
    proc.kill()  # no clean-up: the lock file stays behind
    proc.wait()
    assert (wd / "LOCK").exists()
    p = run_main(env, image_dir, wd, f"--config.total_steps={steps_in(wd)[-1] + 1}")
    assert p.returncode == 0 and "resumed from step" in p.stderr, p.stderr
    assert not (wd / "LOCK").exists()


def test_resume_surprises_are_explicit(env, image_dir, straight):
    """A smaller total_steps says so in one line; another batch size is refused."""
    p = run_main(env, image_dir, straight, "--config.total_steps=10", timeout=120)
    assert p.returncode == 0, p.stderr
    assert (
        f"the checkpoint at step {STRAIGHT_STEPS} already reaches total_steps 10: nothing "
        "to train" in p.stderr
    ), p.stderr
    p = run_main(env, image_dir, straight, "--config.batch_size=16", timeout=120)
    assert_clean_error(p, "trained with batch_size 8", "--config.batch_size=8")
    assert steps_in(straight)[-1] == STRAIGHT_STEPS


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--config.seed=7"], ["trained with seed 0; resuming with seed 7", "--config.seed=0"]),
        (
            ["--config.data.repeat=3"],
            ["with repeat 1, steps_per_epoch 1;", "--config.data.repeat=1 and"],
        ),
        (["--config.steps_per_epoch=5"], ["steps_per_epoch 5", "--config.steps_per_epoch=1"]),
        ([], ["images 4", "resuming with images 3", "the same 4 training images"]),
    ],
)
def test_resume_with_another_data_order_is_refused(
    env, image_dir, straight, tmp_path, flags, needles
):
    """The seed, repeat, steps per epoch and image count fix each step's batch and rate."""
    images = image_dir
    if not flags:  # one training image fewer
        images = tmp_path / "images"
        images.mkdir()
        for f in sorted(os.listdir(image_dir))[:3]:
            (images / f).write_bytes((image_dir / f).read_bytes())
    p = run_main(env, images, straight, f"--config.total_steps={STRAIGHT_STEPS + 2}", *flags)
    assert_clean_error(p, "would shift the data order", *needles)
    assert steps_in(straight)[-1] == STRAIGHT_STEPS


def test_full_disk_is_one_line_naming_the_last_checkpoint(env, image_dir, tmp_path):
    """Writes beyond 30 kB fail (ulimit -f, as on a full disk): one line, exit non-zero."""
    limited = [
        "bash",
        "-c",
        "ulimit -f 30; trap '' XFSZ; exec \"$@\"",
        "-",
        *main_cmd(
            image_dir,
            tmp_path / "run",
            "--config.total_steps=4",
            "--config.checkpoint.every_steps=2",
        ),
    ]
    p = subprocess.run(
        limited,
        env=dict(env, JAX_COMPILATION_CACHE_DIR=""),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # TensorStore's threads may write into the middle of a line, so search, not split.
    errors = re.findall(r"error: ([^\n]*)", p.stderr)
    assert p.returncode != 0 and len(errors) == 1, p.stderr
    for needle in (
        "a checkpoint write failed in",
        "MB free",
        "File too large",
        "The last complete checkpoint is none yet",
    ):
        assert needle in errors[0], p.stderr
    # A write failing half-way can leave TensorStore's writer threads reporting 'Event loop
    # is closed' from C++ (a full disk is refused before writing: see the next test).
    frames = set(re.findall(r'File "([^"]+)"', p.stderr))
    assert frames <= {asyncio.base_events.__file__}, p.stderr


def test_full_disk_is_refused_before_writing(image_dir, tmp_path, monkeypatch):
    import shutil

    from srno_jax import train_cli
    from srno_jax.checkpoints import CheckpointWriteError

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=500_000))
    with pytest.raises(CheckpointWriteError) as e:
        train_cli.run(tiny_config(image_dir, total_steps=2), tmp_path / "run")
    assert f"the disk of {tmp_path / 'run' / 'checkpoints'} is full: 0 MB free" in str(e.value)
    assert "the last complete checkpoint is none yet" in str(e.value)
    assert steps_in(tmp_path / "run") == []


# --- 5. several hosts ----------------------------------------------------------------------


def _port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _slurm_env(env, task):
    """What SLURM gives task `task` of a 2-task step on this machine: no flags needed.
    JAX derives the coordinator's port from the job id (61440 + id % 4096)."""
    port = next(p for p in random.sample(range(61440, 65536), 4096) if _port_is_free(p))
    return dict(
        env,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        SLURM_JOB_ID=str(port - 61440),
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(task),
        SLURM_LOCALID=str(task),
    )


def _start_two_hosts(env, image_dir, workdir, *flags, fault=None):
    """Two SLURM tasks of main.py; `fault`: a fault of tests/train_worker.py injected first."""
    port_env = _slurm_env(env, 0)
    cmd = main_cmd(image_dir, workdir, *flags)
    if fault:
        cmd[1:2] = [str(TESTS / "train_worker.py"), f"--fault={fault}"]
    return [
        subprocess.Popen(
            cmd,
            env=dict(port_env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
            cwd=ROOT,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]


def _finish_all(procs, timeout=300):
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return logs


def _run_two_hosts(env, image_dir, workdir, total):
    logs = _finish_all(_start_two_hosts(env, image_dir, workdir, f"--config.total_steps={total}"))
    for i, log in enumerate(logs):
        assert f"distributed: cluster slurm: process {i} of 2" in log, log
        assert "Traceback" not in log, log
    # One log for the run (process 0's); each host builds only its half of the batch of 8.
    assert "on 4 device(s) of 2 host(s): batch 8 (4 per host)" in logs[0], logs[0]
    assert "step 1/" not in logs[1], logs[1]
    return logs


def test_two_hosts_from_slurm_variables_equal_one_host(env, image_dir, tmp_path, straight):
    """2 SLURM tasks x 2 devices, no flags, resumed once, == the one-process reference run.

    The reference runs on one device: test_train shows 1 device == 8 devices, and a
    separate 4-device run would cost another compile."""
    two = tmp_path / "two"
    _run_two_hosts(env, image_dir, two, 3)
    assert sorted(os.listdir(two / "checkpoints")) == ["3"]  # written once, finalised once
    logs = _run_two_hosts(env, image_dir, two, 5)
    assert all("resumed from step 3" in log for log in logs), logs
    assert sorted(os.listdir(two / "checkpoints")) == ["3", "5"]
    assert_same_params(params_of(two), straight_params(straight, 5))


def test_sigterm_to_one_host_stops_both_at_one_step(env, image_dir, tmp_path, straight):
    wd = tmp_path / "two"
    procs, lines = _start_two_hosts(env, image_dir, wd, "--config.total_steps=100000"), []
    wait_for_step(procs[0], 3, lines)
    t0 = time.time()
    procs[1].send_signal(signal.SIGTERM)
    rest = _finish_all(procs, timeout=120)
    assert time.time() - t0 < 120
    logs = ["".join(lines) + rest[0], rest[1]]
    assert [p.returncode for p in procs] == [0, 0], logs
    stops = [re.findall(r"stopping at step (\d+) \((.+?)\)", log) for log in logs]
    assert stops[0] == [(stops[0][0][0], "a signal to another host")], logs
    assert stops[1] == [(stops[0][0][0], "SIGTERM")], logs
    stopped = int(stops[0][0][0])
    assert steps_in(wd) == [stopped] and stopped + 2 <= STRAIGHT_STEPS
    logs = _run_two_hosts(env, image_dir, wd, stopped + 2)
    assert all(f"resumed from step {stopped}" in log for log in logs), logs
    assert_same_params(params_of(wd), straight_params(straight, stopped + 2))


def test_divergence_on_two_hosts_ends_both_keeping_no_bad_checkpoint(env, image_dir, tmp_path):
    wd = tmp_path / "two"
    procs = _start_two_hosts(env, image_dir, wd, *DIVERGING)
    logs = _finish_all(procs)
    for p, log in zip(procs, logs):
        assert p.returncode != 0 and "Traceback" not in log, log
        assert "error: loss or update non-finite for 3 steps in a row" in log, log
    # Step 1 blew the parameters up, so its checkpoint went with the divergence.
    assert steps_in(wd) == [], steps_in(wd)


@pytest.mark.parametrize(
    "flags, host_env, other_workdir, needles",
    [
        (  # a host's own copy of the data, and its own worker count, are its own
            ["--config.optim.lr=0.002", "--config.data.workers=1", "--config.data.train={copy}"],
            {},
            False,
            ["the hosts were given different configs: optim.lr (process {i} has optim.lr="],
        ),
        (
            [],
            {},
            True,
            ["is not one folder for all hosts: process(es) 1 do not see the lock file"],
        ),
        (
            [],
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
            False,
            ["different numbers of devices (process 0: 2, process 1: 1)"],
        ),
    ],
    ids=["config", "workdir", "devices"],
)
def test_hosts_that_differ_are_refused_at_the_start(
    env, image_dir, tmp_path, flags, host_env, other_workdir, needles
):
    """Process 1 started with another learning rate (its replicas would drift apart with
    exit 0; another total_steps hangs both in different collectives), a workdir that is
    not the folder process 0 sees, or fewer devices: every host stops in one line."""
    base = _slurm_env(env, 0)
    workdirs = [tmp_path / "wd", tmp_path / ("wd1" if other_workdir else "wd")]
    copy = shutil.copytree(image_dir, tmp_path / "copy")
    flags = [f.format(copy=copy) for f in flags]
    procs = [
        subprocess.Popen(
            main_cmd(image_dir, workdirs[i], "--config.total_steps=3", *(flags if i else [])),
            env=dict(base, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), **(host_env if i else {})),
            cwd=ROOT,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    logs = _finish_all(procs, timeout=180)
    for i, (p, log) in enumerate(zip(procs, logs)):
        done = subprocess.CompletedProcess(p.args, p.returncode, None, log)
        assert_clean_error(done, *(n.format(i=i) for n in needles))
        assert "step 1/" not in log, log
    assert not steps_in(workdirs[0])


def test_a_process_whose_peers_never_join_says_why_before_jax_aborts(env, image_dir, tmp_path):
    """SLURM_NTASKS=2 but one process launched (python alone in an sbatch script): JAX
    waits for the other, then aborts in C++ without a Python error; a line says why."""
    p = run_main(_slurm_env(env, 0), image_dir, tmp_path / "run", "--join_timeout_s=8", timeout=120)
    assert p.returncode != 0
    assert "joining the slurm cluster of 2 processes; waiting up to 8 s" in p.stderr, p.stderr
    assert "error: the 2 processes of the slurm cluster have not all joined after 3 s" in p.stderr
    assert "srun -n 2" in p.stderr


def test_hosts_load_disjoint_halves_of_each_batch(image_dir):
    import input_pipeline

    source = input_pipeline.make_source(str(image_dir), "train")
    kw = dict(global_batch=8, seed=0, inp_size=8, sample_q=16, repeat=3, workers=1, prefetch=0)
    with input_pipeline.TrainLoader(source, **kw) as whole:
        full = [next(whole) for _ in range(2)]
    halves = []
    for p in range(2):
        with input_pipeline.TrainLoader(source, process_index=p, process_count=2, **kw) as ld:
            assert ld.local == 4 and ld.first_k == 4 * p
            halves.append([next(ld) for _ in range(2)])
    for step in range(2):
        for key in full[step]:
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), full[step][key]
            )


def test_a_read_only_checkpoints_folder_is_refused_at_the_start(tmp_path, monkeypatch):
    """Root ignores permissions, so the refusal of the write is simulated."""
    (tmp_path / "checkpoints").mkdir()
    real = workdir_lib.epath.Path.write_text

    def read_only(self, *args, **kwargs):
        if self.parent.name == "checkpoints":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(workdir_lib.epath.Path, "write_text", read_only)
    with pytest.raises(ConfigError, match=r"checkpoints is not writable \(Permission denied\)"):
        workdir_lib.check_writable(tmp_path)


def test_a_lock_with_a_stale_heartbeat_is_taken_over_on_the_same_host():
    """A restarted container keeps its host name and reuses pids: a pid that exists (or
    is this process's own) proves nothing when the heartbeat stopped long ago."""
    host = socket.gethostname()
    now = time.time()
    alive = workdir_lib._holder_alive
    assert alive({"host": host, "pid": os.getppid(), "heartbeat": now})
    assert not alive({"host": host, "pid": os.getppid(), "heartbeat": 1})
    assert not alive({"host": host, "pid": os.getpid(), "heartbeat": now, "token": "old"})
    assert not alive({"host": "elsewhere", "pid": os.getppid(), "heartbeat": 1})
    assert alive({"host": "elsewhere", "pid": 1, "heartbeat": now})


def test_a_collective_that_fails_between_hosts_is_one_line_and_a_prompt_exit(
    env, image_dir, tmp_path
):
    """A host 30 s late to a collective on CPU (Gloo): one line, and no wait of minutes in
    JAX's shutdown for hosts that are gone."""
    cmd = main_cmd(image_dir, tmp_path / "run")
    cmd[1:2] = [str(TESTS / "train_worker.py"), "--fault=lost-peer"]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_clean_error(p, "process 0: UNKNOWN: Gloo context initialization failed", "within 30 s")
    assert time.time() - t0 < 60


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_joining_and_training_ends_both_hosts(env, image_dir, tmp_path, sig):
    """JAX's preemption service caught SIGTERM after the join and only logged it: the run
    trained on until SLURM's SIGKILL; a Ctrl-C (which srun passes to every task) left
    each host in JAX's shutdown barrier, waiting for the other, for 5 minutes and a
    fatal error. Now each host stops, at once or at its first step."""
    procs, lines = (
        _start_two_hosts(env, image_dir, tmp_path / "wd", "--config.total_steps=100000"),
        [],
    )
    for line in procs[0].stderr:
        lines.append(line)
        if "distributed: cluster slurm" in line:
            break
    for p in procs:
        p.send_signal(sig)
    logs = _finish_all(procs, timeout=120)
    logs[0] = "".join(lines) + logs[0]
    for p, log in zip(procs, logs):
        assert "Traceback" not in log, log
        assert (p.returncode == 128 + sig and f"error: {sig.name} outside training" in log) or (
            p.returncode == 0 and "stopping at step" in log
        ), log


def test_of_two_runs_taking_over_a_stale_lock_one_wins(tmp_path, monkeypatch):
    """Both read the dead run's lock; the first replaces it; the second, going by what it
    read, must not remove the first's new lock and take the workdir too."""
    import json

    stale = {"host": "gone", "pid": 1, "token": "old", "heartbeat": 0}
    (tmp_path / "LOCK").write_text(json.dumps(stale))
    first, second = workdir_lib.WorkdirLock(tmp_path), workdir_lib.WorkdirLock(tmp_path)
    first.acquire()
    try:
        real, reads = workdir_lib._read, []

        def read_before_the_first_took_it(path):
            reads.append(path)
            return dict(stale) if len(reads) == 1 else real(path)

        monkeypatch.setattr(workdir_lib, "_read", read_before_the_first_took_it)
        with pytest.raises(ConfigError, match="just locked by another run"):
            second.acquire()
        monkeypatch.undo()
        assert json.loads((tmp_path / "LOCK").read_text())["token"] == first.token
        assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]
    finally:
        first.release()
    assert not (tmp_path / "LOCK").exists()


def test_a_holder_learns_that_its_lock_was_taken_over(tmp_path, monkeypatch):
    """A run paused past STALE_S (SIGSTOP, a frozen VM) whose workdir another run took."""
    import json

    monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.05)
    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    try:
        (tmp_path / "LOCK").unlink()  # deleted by hand: taken back, not lost
        deadline = time.time() + 10
        while not (tmp_path / "LOCK").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads((tmp_path / "LOCK").read_text())["token"] == lock.token
        assert lock.lost is None
        other = {"host": "elsewhere", "pid": 42, "token": "other", "heartbeat": time.time()}
        (tmp_path / "LOCK").write_text(json.dumps(other))
        while lock.lost is None and time.time() < deadline:
            time.sleep(0.05)
        assert "taken over by process 42 on host elsewhere" in str(lock.lost)
        time.sleep(0.2)
        assert json.loads((tmp_path / "LOCK").read_text())["token"] == "other"  # left alone
    finally:
        lock.release()
    assert (tmp_path / "LOCK").exists()  # not its own: kept


def test_the_lock_of_the_folder_a_workdir_was_copied_from_is_not_its_own(tmp_path):
    """`cp -r` of a live workdir copies its LOCK, naming a live process that holds the
    original: the copy can resume; the original stays locked."""
    host, now = socket.gethostname(), time.time()
    info = {"host": host, "pid": os.getppid(), "workdir": str(tmp_path / "a"), "heartbeat": now}
    (tmp_path / "a").mkdir()
    alive = workdir_lib._holder_alive
    assert alive(info, workdir_lib.resolve(tmp_path / "a"))
    assert not alive(info, workdir_lib.resolve(tmp_path / "copy"))
    assert alive(dict(info, host="elsewhere"), workdir_lib.resolve(tmp_path / "copy"))


def test_a_run_whose_lock_was_taken_over_stops_without_saving(image_dir, tmp_path, monkeypatch):
    class TakenOverAtTheFourthStep(workdir_lib.WorkdirLock):
        checks = 0

        def check(self):  # read before each step that saves, here every step
            self.checks += 1
            if self.checks > 3:
                self.lost = ConfigError("workdir taken over")
            return self.lost is None

    monkeypatch.setattr(train, "WorkdirLock", TakenOverAtTheFourthStep)
    config = tiny_config(
        image_dir, total_steps=10, checkpoint=dict(every_steps=1, keep=20, keep_every_epochs=0)
    )
    with pytest.raises(ConfigError, match="workdir taken over"):
        train_cli.run(config, tmp_path / "run")
    assert steps_in(tmp_path / "run") == [1, 2, 3]


def test_a_taken_over_lock_is_read_before_the_next_save(image_dir, tmp_path, monkeypatch):
    """Not only at the next heartbeat, up to 30 s and many saves later."""
    import json

    real = checkpoints.save

    def save_then_lose_the_lock(*args, **kwargs):
        real(*args, **kwargs)
        other = {"host": "elsewhere", "pid": 42, "token": "other", "heartbeat": time.time()}
        (tmp_path / "run" / "LOCK").write_text(json.dumps(other))

    monkeypatch.setattr(checkpoints, "save", save_then_lose_the_lock)
    config = tiny_config(
        image_dir, total_steps=10, checkpoint=dict(every_steps=2, keep=20, keep_every_epochs=0)
    )
    with pytest.raises(ConfigError, match="taken over by process 42 on host elsewhere"):
        train_cli.run(config, tmp_path / "run")
    assert steps_in(tmp_path / "run") == [2]
    assert "other" in (tmp_path / "run" / "LOCK").read_text()  # the new holder's, kept


def test_the_heartbeat_survives_failed_writes_and_never_leaves_a_torn_lock(tmp_path, monkeypatch):
    """A full disk: the heartbeat write fails after opening; a lock moved away and back
    (mv run run.bak; mv run.bak run): the re-create fails. Neither may end the heartbeat
    or leave an empty LOCK, which would read as another run's."""
    import json

    monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.05)
    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    try:
        failures = []
        real_write = workdir_lib.epath.Path.write_text

        def full_disk_at_first(self, *args, **kwargs):
            if len(failures) < 3:
                failures.append(self)
                real_write(self, "")  # opened and truncated, nothing written
                raise OSError(28, "No space left on device")
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(workdir_lib.epath.Path, "write_text", full_disk_at_first)
        deadline = time.time() + 10
        while len(failures) < 3 and time.time() < deadline:
            time.sleep(0.05)
        beat = json.loads((tmp_path / "LOCK").read_text())["heartbeat"]
        while json.loads((tmp_path / "LOCK").read_text())["heartbeat"] == beat:
            assert time.time() < deadline and lock._thread.is_alive()
            time.sleep(0.05)
        real_open = os.open
        monkeypatch.setattr(
            workdir_lib.os, "open", lambda *a: (_ for _ in ()).throw(FileNotFoundError(a[0]))
        )
        (tmp_path / "LOCK").unlink()
        time.sleep(0.3)
        assert lock._thread.is_alive() and lock.lost is None
        monkeypatch.setattr(workdir_lib.os, "open", real_open)
        while not (tmp_path / "LOCK").exists():
            assert time.time() < deadline
            time.sleep(0.05)
        assert json.loads((tmp_path / "LOCK").read_text())["token"] == lock.token
        assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]
    finally:
        lock.release()
