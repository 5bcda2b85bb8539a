"""Several hosts: what one host alone meets (an error, a bad read, a full disk, a signal)
stops or moves every host at the same point, in one clear line, never a hang; and how a
process joins a run.

The two-host tests start two SLURM tasks of main.py on this machine (see
test_reliability), with a fault of tests/train_worker.py injected on one of them.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import clusters
from test_reliability import _finish_all, _start_two_hosts, env, steps_in  # noqa: F401
from test_train import image_dir, tiny_config  # noqa: F401  (image_dir is a fixture)

from srno_jax import checkpoints, sharding, train, train_cli
from srno_jax.checkpoints import CheckpointWriteError
from srno_jax.errors import ConfigError


def _two_hosts(env, image_dir, workdir, *flags, fault=None):
    """(return codes, logs) of a two-host run of main.py."""
    procs = _start_two_hosts(env, image_dir, workdir, *flags, fault=fault)
    logs = _finish_all(procs, timeout=150)
    return [p.returncode for p in procs], logs


def _error_line(log):
    """The one `error: ...` line of a log without a traceback."""
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, log
    return errors[0]


def _state(image_dir, step):
    """A fresh train state of the tiny config at `step`, and that config."""
    config = tiny_config(image_dir)
    model, tx = train.model_from_config(config), train.make_optimizer(config)
    return train.init_state(model, tx, 0).replace(step=jnp.asarray(step, jnp.int32)), config


@pytest.mark.parametrize(
    "flag, fault, errors",
    [
        (
            "--config.data.val=/missing",
            None,
            ["'/missing' is neither", "'/missing' is neither"],
        ),
        (
            "--config.data.val={images}",
            "unreadable-validation",
            ["image bad.png is unreadable", "process 0 failed to read the training data"],
        ),
        (
            "--config.total_steps=3",
            "unlockable-workdir",
            ["cannot lock the workdir", "process 0 failed to check or lock the workdir"],
        ),
        (
            "--config.init_from={images}",
            "init-from-on-one-host",
            ["process 1 failed to find init_from", "init_from: no such file or folder"],
        ),
    ],
    ids=[
        "missing-validation-set",
        "validation-image-on-process-0",
        "lock-on-process-0",
        "init-from-on-process-0-only",
    ],
)
def test_a_startup_error_on_one_host_stops_both(env, image_dir, tmp_path, flag, fault, errors):
    rcs, logs = _two_hosts(
        env, image_dir, tmp_path / "run", flag.format(images=image_dir), fault=fault
    )
    assert rcs[0] != 0 and rcs[1] != 0, logs
    for log, needle in zip(logs, errors):
        assert needle in _error_line(log), log
    assert steps_in(tmp_path / "run") == []


def _saved_steps_2_and_4(image_dir, wd):
    """`wd` with checkpoints of a fresh tiny state at steps 2 and 4."""
    state, config = _state(image_dir, 2)
    with checkpoints.managed(wd, keep=5) as mngr:
        checkpoints.save(mngr, state, config)
        checkpoints.save(mngr, state.replace(step=jnp.asarray(4, jnp.int32)), config)
        checkpoints.finish(mngr)
    return wd


def test_hosts_resume_from_the_newest_step_every_host_can_read(env, image_dir, tmp_path):
    """Process 1 fails once to read checkpoint 4: both resume from 2, and 4 is set aside."""
    wd = _saved_steps_2_and_4(image_dir, tmp_path / "run")
    rcs, logs = _two_hosts(
        env, image_dir, wd, "--config.total_steps=2", fault="unreadable-checkpoint"
    )
    assert rcs == [0, 0], logs
    assert all("Traceback" not in log and "resumed from step 2" in log for log in logs), logs
    assert "checkpoints/4 is unreadable on process 1" in logs[0], logs[0]
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4.unreadable"]


def test_hosts_whose_listings_differ_resume_from_the_same_step(env, image_dir, tmp_path):
    """Process 0's listing lacks checkpoint 4 (a stale file system cache): each host used
    to restore the newest step it listed, 2 and 4, and train on from different states."""
    wd = _saved_steps_2_and_4(image_dir, tmp_path / "run")
    rcs, logs = _two_hosts(env, image_dir, wd, "--config.total_steps=5", fault="stale-listing")
    assert rcs == [0, 0], logs
    assert all("Traceback" not in log and "resumed from step 4" in log for log in logs), logs
    assert steps_in(wd) == [2, 4, 5]


def test_an_error_on_one_host_while_training_stops_both_at_one_step(env, image_dir, tmp_path):
    """Process 1's loader dies at step 3: both stop after step 3 and keep checkpoints 1, 2
    (step 3 ran on process 1's last batch, to carry its vote, so it is not saved)."""
    wd = tmp_path / "run"
    rcs, logs = _two_hosts(
        env,
        image_dir,
        wd,
        "--config.total_steps=8",
        "--config.checkpoint.every_steps=1",
        fault="dead-loader",
    )
    assert rcs[0] != 0 and rcs[1] != 0, logs
    assert "process 1 failed by step 3, so every host stopped there" in _error_line(logs[0])
    assert "the data loader failed at step 3: BrokenProcessPool: a worker died" in _error_line(
        logs[1]
    )
    assert steps_in(wd) == [1, 2]


def test_a_full_disk_on_another_host_refuses_the_save_on_every_host(
    image_dir, tmp_path, monkeypatch
):
    """This host has room, process 1 has 3 MB: the save is refused here as well."""
    state, config = _state(image_dir, 2)
    monkeypatch.setattr(sharding, "host_ints", lambda v: np.asarray([v, 3], np.int32))
    with checkpoints.managed(tmp_path, keep=1) as mngr:
        with pytest.raises(CheckpointWriteError, match="is full on process 1: 3 MB free"):
            checkpoints.save(mngr, state, config)
    assert steps_in(tmp_path) == []


def test_a_lost_host_during_a_save_is_not_called_a_full_disk(image_dir, tmp_path):
    state, config = _state(image_dir, 2)
    mngr = checkpoints.manager(tmp_path, keep=1)

    def save(*args, **kwargs):  # Orbax on a barrier that another host never reached
        try:
            raise jax.errors.JaxRuntimeError("DEADLINE_EXCEEDED: Barrier timed out")
        except jax.errors.JaxRuntimeError as e:
            raise TimeoutError("Timed out while waiting for the barrier.") from e

    mngr.save = save
    with pytest.raises(CheckpointWriteError) as e:
        checkpoints.save(mngr, state, config)
    mngr.close()
    assert "the hosts lost each other during the save" in str(e.value)
    assert "the barrier. (DEADLINE_EXCEEDED: Barrier timed out)" in str(e.value)
    assert "disk" not in str(e.value)


# --- joining a run -------------------------------------------------------------------------


@pytest.fixture
def joins(monkeypatch):
    """The arguments of each `jax.distributed.initialize` call, which does nothing here;
    no cluster or JAX_* variable from outside the test."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "JAX_NUM", "JAX_PROCESS")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


SLURM_TASK_1 = dict(
    SLURM_JOB_ID="7", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID="1",
    SLURM_LOCALID="1",
)  # fmt: skip


def test_jax_variables_are_explicit_settings(joins, monkeypatch):
    for name, value in dict(
        SLURM_TASK_1, JAX_COORDINATOR_ADDRESS="h0:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3"
    ).items():
        monkeypatch.setenv(name, value)
    assert sharding.initialize_distributed().startswith("explicit settings")
    assert joins == [
        dict(
            coordinator_address="h0:1234",
            num_processes=4,
            process_id=3,
            cluster_detection_method="deactivate",
            initialization_timeout=300,
        )
    ]
    joins.clear()  # a flag wins over its variable
    sharding.initialize_distributed(None, 2, 1)
    assert joins[0]["num_processes"] == 2 and joins[0]["process_id"] == 1


def test_one_process_looks_for_no_cluster(joins, monkeypatch):
    for name, value in SLURM_TASK_1.items():
        monkeypatch.setenv(name, value)
    assert sharding.initialize_distributed(None, 1, None) == "single process"
    assert joins == []


def test_a_failing_cluster_detection_or_join_is_one_line_naming_the_flags(joins, monkeypatch):
    """Kubernetes' detector raises in a pod outside a Job; a join can fail too."""

    def refuses(**kwargs):
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", refuses)
    with pytest.raises(ConfigError, match=r"joining the multi-host run failed \(ValueError: Num"):
        sharding.initialize_distributed("h0:1234", None, None)
    k8s = next(c for c in clusters.ClusterEnv._cluster_types if c.__name__ == "K8sCluster")
    monkeypatch.setattr(k8s, "is_env_present", classmethod(lambda cls: True))

    def no_job(cls):
        raise RuntimeError("Retry failed with all attempts exhausted")

    monkeypatch.setattr(k8s, "get_process_count", classmethod(no_job))
    with pytest.raises(
        ConfigError, match=r"detecting the cluster failed \(RuntimeError: Retry"
    ) as e:
        sharding.initialize_distributed()
    assert "--num_processes=1" in str(e.value) and "--coordinator_address" in str(e.value)
    assert sharding.initialize_distributed(None, 1, None) == "single process"


def test_a_jax_without_its_cluster_detectors_still_starts(joins, monkeypatch, caplog):
    """The detectors are JAX internals: without them a single-host run starts, and a
    SLURM job of two tasks still joins (JAX reads SLURM's variables by itself)."""
    monkeypatch.delattr(clusters.ClusterEnv, "_cluster_types")
    assert sharding.initialize_distributed() == "single process"
    assert "cluster detectors were not found" in caplog.text
    for name, value in SLURM_TASK_1.items():
        monkeypatch.setenv(name, value)
    assert "SLURM" in sharding.initialize_distributed()
    assert joins == [
        dict(
            coordinator_address=None,
            num_processes=None,
            process_id=None,
            cluster_detection_method=None,
            initialization_timeout=300,
        )
    ]


# --- signals -------------------------------------------------------------------------------


def test_a_signal_while_restoring_or_saving_is_a_vote_to_stop(image_dir, tmp_path, monkeypatch):
    """SIGTERM during the restore stops the run at step 2 (the vote of step 1 is read one
    step late) with a checkpoint; SIGINT while the last save finishes changes nothing.
    Neither reaches the handler from before training."""

    def fatal(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the handler from before")

    def sending(fn, sig):
        def wrapped(*args, **kwargs):
            os.kill(os.getpid(), sig)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        checkpoints, "restore_latest", sending(checkpoints.restore_latest, signal.SIGTERM)
    )
    monkeypatch.setattr(checkpoints, "finish", sending(checkpoints.finish, signal.SIGINT))
    previous = {sig: signal.signal(sig, fatal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train_cli.run(tiny_config(image_dir, total_steps=100), tmp_path / "run")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert steps_in(tmp_path / "run") == [2]


def test_a_stop_for_a_signal_saves_without_validating(image_dir, tmp_path, monkeypatch):
    """The grace period after SIGTERM is for the save: validation (100 DIV2K images in
    the paper's config) could outlast it. A scheduled validation still runs."""
    validated, logged = [], []

    def logging_step(writer, step, *args):
        logged.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_log_progress", logging_step)
    monkeypatch.setattr(
        train, "_validate", lambda *a: validated.append(a[-1]) or {2.0: (a[-1], 0.0)}
    )
    config = tiny_config(image_dir, total_steps=100)
    config.data.val, config.eval.every_steps = str(image_dir), 1
    results = train_cli.run(config, tmp_path / "run")
    stopped = steps_in(tmp_path / "run")[-1]
    assert 2 < stopped < 100 and validated == list(range(1, stopped)), (stopped, validated)
    assert results == {}  # not an earlier step's table, printed as if it were this model's


def test_hosts_with_different_training_sets_are_refused(monkeypatch):
    """Copies of the data of different sizes on two hosts: one line on every host."""
    monkeypatch.setattr(sharding, "host_ints", lambda value: np.asarray([800, 799]))
    with pytest.raises(ConfigError, match=r"training images \(process 0: 800, process 1: 799\)"):
        sharding.check_same(800, "training images", "give every host the same data")
    monkeypatch.setattr(sharding, "host_ints", lambda value: np.asarray([800, 800]))
    sharding.check_same(800, "training images", "give every host the same data")
