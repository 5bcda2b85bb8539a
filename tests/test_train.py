"""Training: loss falls, 1 device == 8 devices, a resumed run == an uninterrupted one."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import demo
from srno_jax import load_checkpoint, sharding, train, train_cli
from srno_jax.errors import ConfigError

TESTS = Path(__file__).resolve().parent


def tiny_config(image_dir, total_steps=6, **overrides):
    """The demo config shrunk to a model and patches that train in seconds."""
    c = demo.get_config()
    c.batch_size = 8
    c.model.encoder_args.n_resblocks = 1
    c.model.encoder_args.n_feats = 8
    c.model.width = 16
    c.model.heads = 2
    c.data.train = str(image_dir)
    c.data.val = ""
    c.data.repeat = 1
    c.data.inp_size = 8
    c.data.sample_q = 64
    c.data.workers = 2
    c.optim.lr = 1e-3
    c.total_steps = total_steps
    c.max_train_minutes = 0.0
    c.log_every_steps = 1
    c.checkpoint.every_steps = 1000
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Four smooth 40 x 48 photographs-to-be: easy to learn, so the loss falls fast."""
    d = tmp_path_factory.mktemp("images")
    yy, xx = np.mgrid[0:40, 0:48] / 48.0
    for i in range(4):
        img = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), np.sin(xx * yy * 4 + i)], -1)
        Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def params_of(workdir):
    return load_checkpoint(workdir)[1]["params"]


def assert_loss_falls(config, steps=40):
    """Trains `config` for `steps` steps through the jitted step and its loader; the mean
    loss of the last 10 steps must be under 0.7x that of the first 5. Returns the loader's
    source."""
    model, tx = train.model_from_config(config), train.make_optimizer(config)
    mesh = sharding.make_mesh()
    state = train.init_state(model, tx, 0)
    step = train.jit_step(model, tx, config, 100, mesh, state)
    losses = []
    with train_cli.training_data(config).batches(0) as loader:
        for _ in range(steps):
            state, m = step(
                state, sharding.to_global(next(loader), mesh), sharding.host_values(0, mesh)
            )
            losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    return loader.source


def test_loss_falls(image_dir):
    assert_loss_falls(tiny_config(image_dir))


def jit_step(config):
    """The tiny model's train step, jitted on one device (a single stop vote), and its
    first state."""
    model, tx = train.model_from_config(config), train.make_optimizer(config)
    step = functools.partial(
        train.train_step,
        stop_votes=jnp.zeros(1, jnp.int32),
        model=model,
        tx=tx,
        config=config,
        steps_per_epoch=10,
    )
    return jax.jit(step), jax.jit(lambda: train.init_state(model, tx, 0))()


def random_batch(seed, bad=False):
    """A batch for the tiny model: 2 images of 8^2, 16 queries (a NaN target if `bad`)."""
    r = np.random.default_rng(seed)
    b = {
        "inp": r.uniform(-1, 1, (2, 8, 8, 3)),
        "coord": r.uniform(-1, 1, (2, 16, 2)),
        "cell": np.full((2, 2), 0.1),
        "gt": r.uniform(-1, 1, (2, 16, 3)),
    }
    if bad:
        b["gt"][1, 3, 0] = np.nan
    return {k: jnp.asarray(v, jnp.float32) for k, v in b.items()}


def test_step_is_adam_leaf_by_leaf(image_dir):
    """The step runs Adam on one vector of all parameters; the result must equal optax's
    update of each leaf, in a state with the same tree, shapes and dtypes (checkpoints)."""
    config = tiny_config(image_dir)
    step, state = jit_step(config)
    model, tx = train.model_from_config(config), train.make_optimizer(config)

    @jax.jit
    def leaf_by_leaf(state, batch):
        loss, grads = jax.value_and_grad(train.l1_loss)(state.params, model, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = train.learning_rate(state.step, config, 10)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        return params, opt_state, optax.tree.norm(grads)

    for seed in range(3):  # from the second step on, Adam's moments are not zero
        batch = random_batch(seed)
        params, opt_state, norm = leaf_by_leaf(state, batch)
        new, metrics = step(state, batch)
        assert bool(metrics["finite"])
        np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
        for got, want in [(new.params, params), (new.opt_state, opt_state)]:
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                assert g.shape == w.shape and g.dtype == w.dtype
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
        state = new


def test_flat_round_trip_keeps_each_leafs_shape_and_dtype():
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4, jnp.bfloat16)}}
    state = (jnp.int32(3), params, jax.tree.map(lambda x: -x, params))
    flat = train._Flat(params)
    vectors = flat.ravel(state)
    assert vectors[0].shape == () and vectors[1].shape == vectors[2].shape == (10,)
    back = flat.unravel(vectors, state)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_steps_past_the_schedule_are_warned_of(image_dir, tmp_path, caplog):
    config = tiny_config(image_dir, total_steps=3)  # one step an epoch
    config.optim.epochs = 2
    train_cli.run(config, tmp_path / "run")
    assert (
        "total_steps 3 runs past the learning-rate schedule, which ends at step 2 "
        "(optim.epochs 2 x 1 steps/epoch): the steps after it train at rate 0. "
        "Raise --config.optim.epochs to 3" in caplog.text
    ), caplog.text


def _nan_batches(monkeypatch, steps):
    """The loader's batches of these steps (1-based, counted from the run's start) hold NaN."""
    import input_pipeline

    original, calls = input_pipeline.TrainLoader.__next__, []

    def next_batch(self):
        batch = original(self)
        calls.append(1)
        if len(calls) in steps:
            batch = dict(batch, inp=np.full_like(batch["inp"], np.nan))
        return batch

    monkeypatch.setattr(input_pipeline.TrainLoader, "__next__", next_batch)


def test_a_non_finite_last_step_is_saved_and_said(image_dir, tmp_path, monkeypatch, caplog):
    """The last step skipped as non-finite (a bad batch) is still saved, else a rerun
    would train from the start: its checkpoint holds the parameters of the step before,
    and a warning says so."""
    train_cli.run(tiny_config(image_dir, total_steps=2), tmp_path / "two")
    _nan_batches(monkeypatch, {3})
    train_cli.run(tiny_config(image_dir, total_steps=3), tmp_path / "bad")
    assert os.listdir(tmp_path / "bad" / "checkpoints") == ["3"]
    assert "the last 1 step(s), 3..3, were non-finite and skipped" in caplog.text, caplog.text
    for got, want in zip(
        jax.tree.leaves(load_checkpoint(tmp_path / "bad")[1]),
        jax.tree.leaves(load_checkpoint(tmp_path / "two")[1]),
    ):
        np.testing.assert_array_equal(got, want)
    # The streak's count is not saved: a resumed run starts from those parameters afresh.
    import orbax.checkpoint as ocp

    rest = ocp.StandardCheckpointer().restore(
        tmp_path / "bad" / "checkpoints" / "3" / "train_state"
    )
    assert int(rest["step"]) == 3 and int(rest["nonfinite"]) == 0
    # Resumed with one step left, and that one non-finite: the same, not an error that
    # every rerun (the same batch) would repeat.
    monkeypatch.undo()
    _nan_batches(monkeypatch, {1})
    train_cli.run(tiny_config(image_dir, total_steps=3), tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "3"]


def test_a_stop_before_any_finite_step_saves_nothing_and_is_no_error(
    image_dir, tmp_path, monkeypatch, caplog
):
    """A preemption during a short streak from step 1 (limit 20): the run stops as
    stopped, with nothing to save, whenever the signal lands."""
    import signal

    import input_pipeline

    _nan_batches(monkeypatch, {1, 2, 3})
    inner, calls = input_pipeline.TrainLoader.__next__, []

    def next_batch(self):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a vote to stop, in StopVote's hands
        return inner(self)

    monkeypatch.setattr(input_pipeline.TrainLoader, "__next__", next_batch)
    caplog.set_level("INFO", logger="srno_jax")
    train_cli.run(tiny_config(image_dir, total_steps=6), tmp_path / "run")
    assert not os.listdir(tmp_path / "run" / "checkpoints")
    assert "no step was finite yet, so nothing is saved: a rerun starts afresh" in caplog.text


def test_a_run_whose_every_step_was_non_finite_is_an_error(image_dir, tmp_path, monkeypatch):
    """Fewer non-finite steps than max_nonfinite_steps, but not one finite: nothing was
    trained, and exit 0 would call that a success."""
    _nan_batches(monkeypatch, {1, 2, 3})
    with pytest.raises(
        train.TrainingDiverged, match=r"non-finite for 3 steps in a row, steps 1\.\.3"
    ):
        train_cli.run(tiny_config(image_dir, total_steps=3), tmp_path / "run")
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "3")


def test_validation_images_too_small_for_a_scale_are_refused_at_the_start(image_dir, tmp_path):
    from srno_jax.errors import ConfigError

    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "tiny.png")
    config = tiny_config(image_dir)
    config.data.val, config.eval.scales = str(tmp_path), (2.0,)
    with pytest.raises(ConfigError, match=r"image 0 \(3x3\) cannot be validated at x2: a 2x2"):
        train_cli.training_data(config)


def test_resume_equals_uninterrupted(image_dir, tmp_path):
    train_cli.run(tiny_config(image_dir, total_steps=6), tmp_path / "straight")
    train_cli.run(tiny_config(image_dir, total_steps=3), tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    train_cli.run(tiny_config(image_dir, total_steps=6), tmp_path / "resumed")
    a, b = params_of(tmp_path / "straight"), params_of(tmp_path / "resumed")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
    # Training moved the parameters (so the comparison above means something).
    init = train.init_state(
        train.model_from_config(tiny_config(image_dir)),
        train.make_optimizer(tiny_config(image_dir)),
        0,
    ).params
    assert float(jnp.abs(a["lifting"]["kernel"] - init["lifting"]["kernel"]).max()) > 1e-4


def test_a_resume_with_other_settings_says_which(image_dir, tmp_path, caplog):
    """A resumed run may change its learning rate or compute dtype (it applies from the
    resumed step on), but a mistyped flag must not pass unseen; how long it runs, how
    often it saves, and how it loads its data are not worth a word. The settings
    compared are those of the step restored, not of a newer one that proved unreadable."""
    import shutil

    train_cli.run(tiny_config(image_dir, total_steps=2), tmp_path / "run")
    config = tiny_config(image_dir, total_steps=3)
    config.optim.lr, config.compute_dtype = 0.5, "bfloat16"
    config.checkpoint.every_steps, config.data.workers = 7, 1
    train_cli.run(config, tmp_path / "run")
    warned = lambda: [r.getMessage() for r in caplog.records if "other than its" in r.getMessage()]
    (line,) = warned()
    assert line.endswith(
        "from here on: compute_dtype 'float32' -> 'bfloat16', optim.lr 0.001 -> 0.5"
    ), line
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "3" / "params")  # step 3 unreadable
    caplog.clear()
    config.total_steps = 4
    train_cli.run(config, tmp_path / "run")
    (line,) = warned()  # step 2's settings, though step 3's were the run's own
    assert "optim.lr 0.001 -> 0.5" in line, line


def test_a_resume_with_another_keep_every_keeps_what_was_kept_for_good(image_dir, tmp_path):
    """Orbax applies the resumed run's retention to every step: a resume with another
    checkpoint.keep_every_epochs must not delete the steps kept for good before it."""

    def run(total, keep_every_epochs):
        config = tiny_config(image_dir, total_steps=total)  # one step an epoch
        config.checkpoint.update(every_steps=1, keep=1, keep_every_epochs=keep_every_epochs)
        train_cli.run(config, tmp_path / "run")
        return sorted(int(n) for n in os.listdir(tmp_path / "run" / "checkpoints"))

    assert run(7, 2) == [2, 4, 6, 7]
    assert run(10, 0) == [2, 4, 6, 9, 10]
    assert run(13, 4) == [2, 4, 6, 12, 13]  # 9 and 10 were kept by no run for good


def test_one_device_equals_eight(image_dir, tmp_path):
    """The same global batches on 1 and on 8 (fake CPU) devices give the same parameters."""
    out = {}
    for n in (1, 8):
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        )
        subprocess.run(
            [
                sys.executable,
                str(TESTS / "train_worker.py"),
                str(image_dir),
                str(tmp_path / f"w{n}"),
                str(tmp_path / f"p{n}.npz"),
                "3",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        out[n] = np.load(tmp_path / f"p{n}.npz")
    assert int(out[1]["devices"]) == 1 and int(out[8]["devices"]) == 8
    for k in out[1].files:
        if k != "devices":
            np.testing.assert_allclose(out[8][k], out[1][k], rtol=0, atol=1e-6, err_msg=k)


def test_batch_not_divisible_by_devices(image_dir):
    from srno_jax.errors import ConfigError

    class Mesh:  # 8 devices without starting 8 of them
        devices = np.zeros(8)

    with pytest.raises(ConfigError, match="batch_size 12 is not divisible by the 8 devices"):
        sharding.check_batch_size(12, Mesh())


def test_resume_on_another_device_count(image_dir, tmp_path):
    """A checkpoint written on 1 device resumes on 8 and ends as an uninterrupted run."""

    def run(n, workdir, steps):
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        )
        p = subprocess.run(
            [
                sys.executable,
                str(TESTS / "train_worker.py"),
                str(image_dir),
                str(workdir),
                str(tmp_path / f"{workdir.name}_{n}_{steps}.npz"),
                str(steps),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return np.load(tmp_path / f"{workdir.name}_{n}_{steps}.npz"), p.stderr

    straight, _ = run(1, tmp_path / "straight", 4)
    run(1, tmp_path / "moved", 2)
    moved, log = run(8, tmp_path / "moved", 4)
    assert int(moved["devices"]) == 8 and "resumed from step 2" in log, log
    for k in straight.files:
        if k != "devices":
            np.testing.assert_allclose(moved[k], straight[k], rtol=0, atol=1e-6, err_msg=k)


def test_time_limit_is_voted_on_process_zeros_clock_alone(monkeypatch):
    """Every host reads the agreed vote; only process 0's clock can vote for the time limit,
    so hosts whose clocks differ still stop after the same step."""
    import time

    mesh = sharding.make_mesh()
    stop = train.StopVote(max_minutes=1e-6)
    time.sleep(0.01)
    assert int(jnp.max(stop.votes(mesh))) == train.STOP_TIME
    assert stop.reason(train.STOP_TIME) == "time limit"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert int(jnp.max(stop.votes(mesh))) == 0
    stop.signal = "SIGTERM"
    assert int(jnp.max(stop.votes(mesh))) == train.STOP_SIGNAL
    assert train.StopVote(0).reason(train.STOP_SIGNAL) == "a signal to another host"


def test_every_numeric_config_field_has_a_range():
    from configs import default
    from srno_jax.config_checks import RULES, check_config
    from srno_jax.errors import ConfigError

    config = default.get_config()
    check_config(config)
    numeric = {
        f"{k}.{kk}" if isinstance(v, dict) else k
        for k, v in config.to_dict().items()
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
        if isinstance(vv, (int, float)) and not isinstance(vv, bool)
    }
    assert "optim.lr" in numeric and numeric <= set(RULES), numeric - set(RULES)
    for field in RULES:
        bad = default.get_config()
        node, *path = [bad] + field.split(".")
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = -1 if isinstance(node[path[-1]], int) else float("nan")
        with pytest.raises(ConfigError, match=rf"config field {field} = "):
            check_config(bad)


def _like_the_small_golden_model(config):
    config.model.encoder_args.n_resblocks = 2
    config.model.encoder_args.n_feats = 64
    config.model.width, config.model.heads = 64, 4
    return config


def test_a_new_run_starts_from_init_from_and_a_resumed_one_from_its_own(image_dir, tmp_path):
    """Fine-tuning the reference's model: step 1 moves each weight by about the learning
    rate from the .pth's; a resumed run reads its own checkpoint, not init_from."""
    from conftest import require_golden

    pth = require_golden("small_edsr_srno") / "checkpoint.pth"
    _, reference = load_checkpoint(pth)
    config = _like_the_small_golden_model(tiny_config(image_dir, total_steps=1))
    config.init_from, config.optim.lr = str(pth), 1e-9
    config.checkpoint.keep_every_epochs = 0
    train_cli.run(config, tmp_path / "run")
    _, tuned = load_checkpoint(tmp_path / "run")
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), tuned, reference)
    assert 0 < max(jax.tree.leaves(moved)) < 1e-7
    # Resumed: init_from is neither read nor needed (deleted since, say).
    config.init_from, config.total_steps = str(tmp_path / "deleted.pth"), 2
    train_cli.run(config, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")  # step 2 saved


@pytest.mark.parametrize(
    "golden, message",
    [
        (
            "small_edsr_srno",
            "holds another model than the config's; set --config.model.encoder_args.n_feats=64 "
            "--config.model.encoder_args.n_resblocks=2 --config.model.heads=4 "
            "--config.model.width=64$",
        ),
        ("rdn_srno", "its encoder is rdn: start from --config rdn$"),
        (None, "config field init_from = '.*nope.pth': no such file or folder"),
    ],
)
def test_init_from_another_model_is_refused_with_the_flags_that_fit(
    image_dir, tmp_path, golden, message
):
    """The flags named are the config's own (encoder_args.G0, not the module's g0)."""
    from conftest import require_golden

    config = tiny_config(image_dir, total_steps=1)
    config.init_from = str(
        require_golden(golden) / "checkpoint.pth" if golden else tmp_path / "nope.pth"
    )
    with pytest.raises(ConfigError, match=message):
        train_cli.run(config, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/*"))
