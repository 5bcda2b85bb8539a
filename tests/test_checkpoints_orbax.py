"""This package's Orbax checkpoints: layouts old and new, refusals, and unreadable steps."""

import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import image_dir, tiny_config  # noqa: F401  (image_dir is a fixture)

from srno_jax import (
    CheckpointError,
    checkpoints,
    eval_cli,
    load_checkpoint,
    train,
    train_cli,
    upscale_cli,
)
from srno_jax.errors import ConfigError

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_workdir"


def assert_same(a, b, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol),
        a,
        b,
    )


@pytest.fixture(scope="module")
def run4(image_dir, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    wd = tmp_path_factory.mktemp("run4")
    train_cli.run(
        tiny_config(
            image_dir, total_steps=4, checkpoint=dict(every_steps=2, keep=5, keep_every_epochs=0)
        ),
        wd,
    )
    return wd


def test_params_are_their_own_item(run4):
    step = run4 / "checkpoints" / "4"
    assert {p.name for p in step.iterdir() if p.is_dir()} == {"params", "train_state", "meta"}


def test_legacy_layout_loads_and_resumes(image_dir, tmp_path, run4):
    """A workdir saved as {'state', 'meta'} (tests/data/legacy_workdir, step 2 of this
    tiny config) still loads for inference and resumes training to the same parameters."""
    _, legacy = load_checkpoint(LEGACY)
    _, fresh = load_checkpoint(run4 / "checkpoints" / "2")
    assert_same(legacy["params"], fresh["params"])
    wd = tmp_path / "legacy"
    shutil.copytree(LEGACY, wd)
    train_cli.run(tiny_config(image_dir, total_steps=4), wd)
    assert_same(load_checkpoint(wd)[1]["params"], load_checkpoint(run4)[1]["params"])


def test_export_for_inference_float16(run4, tmp_path):
    out = checkpoints.export_for_inference(run4, tmp_path / "export", dtype="float16")
    assert {p.name for p in out.iterdir()} == {"params", "meta"}
    _, full = load_checkpoint(run4)
    _, half = load_checkpoint(out)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half["params"]))
    assert_same(half["params"], full["params"], atol=2e-3)
    with pytest.raises(CheckpointError, match="exists"):
        checkpoints.export_for_inference(run4, out)
    # Exported as a step of a run, it would be read as that run's newest step.
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    with pytest.raises(CheckpointError, match=r"checkpoints/7 would be read as a step of the"):
        checkpoints.export_for_inference(run4, wd / "checkpoints" / "7")
    assert sorted(os.listdir(wd / "checkpoints")) == sorted(os.listdir(run4 / "checkpoints"))
    checkpoints.export_for_inference(run4, tmp_path / "models" / "checkpoints" / "srno_fp16")


def test_a_step_folder_named_after_another_step_is_refused(image_dir, run4, tmp_path):
    """A kept copy of step 2 named 100 would be taken for the newest: refused in one line."""
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    shutil.copytree(wd / "checkpoints" / "2", wd / "checkpoints" / "100")
    message = r"checkpoints/100 holds step 2; rename it to 2 or move it out of"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(wd)
    with pytest.raises(CheckpointError, match=message):
        train_cli.run(tiny_config(image_dir, total_steps=6), wd)


def test_a_legacy_checkpoint_refuses_another_seed(image_dir, tmp_path):
    wd = tmp_path / "legacy"
    shutil.copytree(LEGACY, wd)
    with pytest.raises(ConfigError, match="trained with seed 0; resuming with seed 7"):
        train_cli.run(tiny_config(image_dir, total_steps=4, seed=7), wd)


def test_export_falls_back_as_loading_does_and_refuses_an_overflow(run4, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    shutil.rmtree(wd / "checkpoints" / "4" / "params")  # the newest step is unreadable
    out = checkpoints.export_for_inference(wd, tmp_path / "export")
    assert_same(
        load_checkpoint(out)[1]["params"], load_checkpoint(run4 / "checkpoints" / "2")[1]["params"]
    )
    big = tmp_path / "big"
    shutil.copytree(run4, big)
    mngr = checkpoints.manager(big, keep=3)
    model, tx = train.model_from_config(tiny_config(".")), train.make_optimizer(tiny_config("."))
    state = train.init_state(model, tx, 0)
    params = jax.tree.map(lambda x: x, state.params)
    params["lifting"]["bias"] = params["lifting"]["bias"].at[0].set(1e5)
    checkpoints.save(mngr, state.replace(params=params, step=jnp.asarray(9)), tiny_config("."))
    mngr.wait_until_finished()
    mngr.close()
    with pytest.raises(
        CheckpointError, match=r"params\['lifting'\]\['bias'\] exceeds float16's range"
    ):
        checkpoints.export_for_inference(big, tmp_path / "half", dtype="float16")
    assert not (tmp_path / "half").exists()


def test_export_dtypes(run4, tmp_path):
    out = checkpoints.export_for_inference(run4, tmp_path / "bf16", dtype="bfloat16")
    _, full = load_checkpoint(run4)
    assert_same(load_checkpoint(out)[1]["params"], full["params"], atol=2e-2)
    with pytest.raises(ConfigError, match="'int8' is not one of"):
        checkpoints.export_for_inference(run4, tmp_path / "int8", dtype="int8")


DEMO = Path(__file__).resolve().parents[1] / "examples" / "assets" / "demo_srno"


@pytest.mark.parametrize(
    "edit, message",
    [
        (('"n_feats": 64', '"n_feats": 48'), r"has shape \(48,\), but the stored one has \(64,\)"),
        (('"heads": 4', '"heads": 2'), "shape"),
        (('"params_dtype": "float16"', '"params_dtype": "int8"'), "params_dtype 'int8'"),
    ],
)
def test_edited_meta_is_one_line_before_any_read(tmp_path, edit, message):
    """A meta that does not describe the stored arrays: refused from the metadata alone,
    so no TensorStore read is left to print tracebacks at exit."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO, ckpt)
    meta = ckpt / "meta" / "metadata"
    meta.write_text(meta.read_text().replace(*edit))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from srno_jax import load_checkpoint; load_checkpoint({str(ckpt)!r})",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and re.search(message, proc.stderr), proc.stderr[-2000:]
    assert proc.stderr.count("Traceback") == 1  # the CheckpointError's own, nothing at exit


def test_non_finite_orbax_checkpoint_is_refused(image_dir, tmp_path):
    config = tiny_config(image_dir)
    model, tx = train.model_from_config(config), train.make_optimizer(config)
    state = train.init_state(model, tx, 0)
    params = jax.tree.map(lambda x: x, state.params)
    params["lifting"]["bias"] = params["lifting"]["bias"].at[0].set(jnp.nan)
    mngr = checkpoints.manager(tmp_path, keep=1)
    checkpoints.save(mngr, state.replace(params=params, step=jnp.asarray(1)), config)
    checkpoints.finish(mngr)
    with pytest.raises(CheckpointError, match="lifting/bias holds NaN"):
        load_checkpoint(tmp_path)


def _truncate_params(step_dir):
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_params,
        lambda d: shutil.rmtree(d / "params"),
        lambda d: (d / "meta" / "metadata").write_text("{not json"),
    ],
    ids=["truncated", "missing-item", "edited-metadata"],
)
def test_unreadable_latest_falls_back(image_dir, tmp_path, run4, damage, caplog):
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    damage(wd / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, logger="srno_jax"):
        _, params, source = checkpoints.read_checkpoint(wd)
    assert any("checkpoints/4 is unreadable" in r.getMessage() for r in caplog.records)
    assert source == f"{wd / 'checkpoints' / '2'} (step 2)"
    assert_same(params["params"], load_checkpoint(run4 / "checkpoints" / "2")[1]["params"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="srno_jax"):
        train_cli.run(tiny_config(image_dir, total_steps=4), wd)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoints/4 is unreadable" in m for m in messages), messages
    assert "resumed from step 2" in messages, messages
    assert_same(load_checkpoint(wd)[1]["params"], load_checkpoint(run4)[1]["params"])


def test_the_tools_name_the_step_they_read(run4, image_dir, tmp_path, capsys):
    """A workdir's newest step changes while it trains: eval.py and srno-upscale say
    which one they read, and the JSON records it."""
    newest = f"{run4 / 'checkpoints' / '4'} (step 4)"
    assert checkpoints.read_checkpoint(run4)[2] == newest
    export = checkpoints.export_for_inference(run4, tmp_path / "export")
    assert checkpoints.read_checkpoint(export)[2] == f"{export} (exported from step 4)"
    photo = image_dir / "0.png"
    data = tmp_path / "set"
    data.mkdir()
    shutil.copy(photo, data)
    args = ["--checkpoint", str(run4), "--data", str(data), "--scales", "2"]
    assert (
        eval_cli.main([*args, "--json", str(tmp_path / "r.json"), "--compilation_cache", ""]) == 0
    )
    assert f"read {newest}" in capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["read"] == {str(run4): newest}
    out = tmp_path / "up.png"
    assert upscale_cli.main([str(photo), str(out), "--scale", "2", "--checkpoint", str(run4)]) == 0
    assert f"model from {newest}" in capsys.readouterr().err


def test_a_damaged_array_file_is_one_warning_not_a_flood_of_tracebacks(
    image_dir, tmp_path, run4, monkeypatch
):
    """A failed TensorStore read leaves Orbax's other reads to end on a closed event
    loop, each reported as an unraisable exception: hundreds of tracebacks."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)[:80]))
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    for f in (wd / "checkpoints" / "4" / "params").glob("ocdbt.process_*/d/*"):
        if f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    train_cli.run(tiny_config(image_dir, total_steps=4), wd)
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["2", "4", "4.unreadable"]
    time.sleep(1)  # the abandoned reads end in their own threads
    gc.collect()
    assert not seen, seen
    # A minute after the failed read, the same message from the user's code is reported.
    load_checkpoint(run4)
    monkeypatch.setitem(checkpoints._quiet, "until", time.monotonic())

    class Closing:
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    Closing()
    gc.collect()
    assert seen == ["RuntimeError('Event loop is closed')"], seen


def test_every_keep_every_epochs_step_outlives_keep(image_dir, tmp_path):
    """The paper's recipe keeps epochs 250, 500, 750 and 1000 (its published model) past
    the newest `keep`; here one step is an epoch."""
    config = tiny_config(
        image_dir, total_steps=8, checkpoint=dict(every_steps=1, keep=1, keep_every_epochs=3)
    )
    train_cli.run(config, tmp_path / "run")
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [3, 6, 7, 8]


def test_no_readable_checkpoint_is_one_error(tmp_path, run4, image_dir):
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    for step in ("2", "4"):
        (wd / "checkpoints" / step / "meta" / "metadata").write_text("")
    with pytest.raises(CheckpointError, match=r"cannot be read"):
        load_checkpoint(wd)
    with pytest.raises(CheckpointError, match=r"none of the checkpoints \[4, 2\]"):
        train_cli.run(tiny_config(image_dir, total_steps=6), wd)


def test_damaged_array_files_are_one_short_line(tmp_path, run4):
    """TensorStore's message carries its whole spec, kilobytes of JSON."""
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    for f in (wd / "checkpoints").glob("*/params/**/d/*"):
        f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="incomplete or damaged") as e:
        load_checkpoint(wd)
    assert "tensorstore_spec" not in str(e.value) and "\\" not in str(e.value)
    assert "is not valid for value of size 10" in str(e.value)  # the cause is kept


@pytest.mark.parametrize(
    "listed, deleted", [(["4", "2"], ["4", "2"]), (["4"], ["4/params"])], ids=["gone", "going"]
)
def test_steps_deleted_while_read_give_way_to_a_new_one(
    tmp_path, run4, image_dir, monkeypatch, listed, deleted
):
    """srno-upscale or eval.py on a live run: while step 4 is read, the run saves step 6
    and its keep policy deletes every step of the first listing, or is still deleting
    the only one listed (its folder still there, as a bucket's for seconds)."""
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    config = tiny_config(
        image_dir, total_steps=6, checkpoint=dict(every_steps=2, keep=5, keep_every_epochs=0)
    )
    train_cli.run(config, wd)
    ckpts = wd / "checkpoints"
    for step in {"2", "4"} - set(listed):
        shutil.rmtree(ckpts / step)
    (ckpts / "6").rename(tmp_path / "6")
    real, reads = checkpoints._load_step, []

    def saved_and_deleted_while_read(step_dir):
        reads.append(step_dir.name)
        if len(reads) == 1:
            (tmp_path / "6").rename(ckpts / "6")
            for d in deleted:
                shutil.rmtree(ckpts / d)
            raise FileNotFoundError(step_dir / "params")
        return real(step_dir)

    monkeypatch.setattr(checkpoints, "_load_step", saved_and_deleted_while_read)
    assert checkpoints.read_checkpoint(wd)[2].endswith("checkpoints/6 (step 6)")
    assert reads == ["4", "6"]


def test_a_skipped_step_leaves_one_warning_and_no_tracebacks(tmp_path, run4):
    """Its abandoned TensorStore reads end on a closed event loop; each was printed as a
    traceback when the metadata read, not the restore, was the one that failed."""
    from PIL import Image

    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    shutil.rmtree(wd / "checkpoints" / "4" / "params" / "d")
    Image.new("RGB", (12, 10)).save(tmp_path / "in.png")
    cmd = [sys.executable, "-m", "srno_jax.upscale_cli", str(tmp_path / "in.png")]
    cmd += [str(tmp_path / "out.png"), "--scale", "2", "--checkpoint", str(wd)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert (
        lines[0].startswith("srno-upscale: warning: checkpoint ") and "4 is unreadable" in lines[0]
    )
    assert "Traceback" not in p.stderr and len(lines) == 2, p.stderr  # and "model from ..."


def test_abandoned_read_tasks_are_not_logged_while_reads_are_quiet(caplog, monkeypatch):
    """asyncio logs a collected task of an abandoned read as "never retrieved", at a time
    set by the garbage collector; within a failed read's quiet minute it is dropped."""
    monkeypatch.setitem(checkpoints._quiet, "until", time.monotonic() + 60)
    checkpoints._quiet_abandoned_reads()
    message = "Task exception was never retrieved\nfuture: <Task finished>"
    logging.getLogger("asyncio").error(message)
    logging.getLogger("asyncio").error("_GatheringFuture exception was never retrieved")
    assert not caplog.records
    monkeypatch.setitem(checkpoints._quiet, "until", 0.0)
    logging.getLogger("asyncio").error(message)
    assert [r.getMessage() for r in caplog.records] == [message]


def test_a_step_set_aside_twice_keeps_both_copies(image_dir, tmp_path, run4):
    """Step 4 unreadable, set aside, written again and unreadable again: the second
    set-aside must not collide with the first and block every resume."""
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    for round_ in range(2):
        (wd / "checkpoints" / "4" / "meta" / "metadata").write_text("{not json")
        train_cli.run(tiny_config(image_dir, total_steps=4), wd)  # falls back to 2, redoes 4
    names = sorted(p.name for p in (wd / "checkpoints").iterdir())
    assert names == ["2", "4", "4.unreadable", "4.unreadable.2"], names


def test_only_orbax_step_names_are_steps(run4, tmp_path):
    """'²' passes str.isdigit; '0010' is no name Orbax writes: neither is a step."""
    wd = tmp_path / "run"
    shutil.copytree(run4, wd)
    shutil.copytree(wd / "checkpoints" / "4", wd / "checkpoints" / "0010")
    (wd / "checkpoints" / "²").mkdir()
    assert [p.name for p in checkpoints._step_dirs(wd)] == ["4", "2"]
    load_checkpoint(wd)


def test_a_failed_write_names_the_last_complete_step(run4, tmp_path):
    mngr = checkpoints.manager(run4, keep=10)
    assert checkpoints._last_complete(mngr) == "step 4"
    assert checkpoints._last_complete(mngr, 4) == "step 2"


@pytest.mark.parametrize("golden", ["small_edsr_srno", "rdn_srno"])
def test_parameters_changed_in_a_notebook_are_saved_for_inference(golden, tmp_path):
    """Fine-tuned or edited in memory, from a reference .pth (EDSR and RDN): saved, they
    load as the same model with the same numbers; a .pth exports directly too."""
    from conftest import require_golden

    pth = require_golden(golden) / "checkpoint.pth"
    model, variables = load_checkpoint(pth)
    tuned = jax.tree.map(lambda x: x * 1.01, variables)
    out = checkpoints.save_for_inference(model, tuned, tmp_path / "tuned")
    again, loaded = load_checkpoint(out)
    assert again == model
    assert_same(loaded["params"], tuned["params"], atol=0)
    half = checkpoints.export_for_inference(pth, tmp_path / "half", dtype="float16")
    assert_same(load_checkpoint(half)[1]["params"], variables["params"], atol=2e-3)
    assert checkpoints.read_checkpoint(half)[2] == str(half)  # no step: not from a run
    other = train.model_from_config(tiny_config("."))
    with pytest.raises(ConfigError, match="the variables do not fit the model"):
        checkpoints.save_for_inference(other, variables, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_an_export_of_an_export_keeps_the_step_it_came_from(run4, tmp_path):
    first = checkpoints.export_for_inference(run4, tmp_path / "a", dtype="float16")
    second = checkpoints.export_for_inference(first, tmp_path / "b")
    assert checkpoints.read_checkpoint(second)[2].endswith("(exported from step 4)")
