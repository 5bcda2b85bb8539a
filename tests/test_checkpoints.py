"""Importing reference checkpoints: architecture from args, every key and shape checked."""

import os

import jax
import numpy as np
import pytest
from conftest import require_golden
from test_torch_pickle import Storage, tensor, write_ckpt

from srno_jax import CheckpointError, load_checkpoint, make_model
from srno_jax.checkpoints import (
    abstract_variables,
    params_from_torch,
    params_to_torch,
    read_checkpoint,
)
from srno_jax.torch_pickle import read_pth


def save_pth(path, obj):
    """Writes `obj` (numpy arrays as float32 tensors) in torch.save's zip format."""
    storages = {}

    def convert(x):
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            key = str(len(storages))
            storages[key] = np.ascontiguousarray(x, np.float32).tobytes()
            strides = tuple(int(s) for s in np.cumprod((1,) + x.shape[:0:-1])[::-1])
            return tensor(Storage("FloatStorage", key, x.size), 0, tuple(x.shape), strides)
        return x

    return write_ckpt(path, convert(obj), storages)


@pytest.fixture(scope="module")
def small_ckpt():
    return read_pth(require_golden("small_edsr_srno") / "checkpoint.pth")


def with_model(ckpt, **changes):
    model = dict(ckpt["model"], **changes)
    return dict(ckpt, model=model)


def test_architecture_comes_from_args(small_ckpt):
    model, variables = load_checkpoint(require_golden("small_edsr_srno") / "checkpoint.pth")
    assert (model.width, model.heads, model.encoder.n_resblocks) == (64, 4, 2)
    assert variables["params"]["lifting"]["kernel"].shape == (266, 64)


def test_a_pth_is_read_with_the_epoch_it_records():
    path = require_golden("small_edsr_srno") / "checkpoint.pth"
    assert read_checkpoint(path)[2] == f"{os.path.abspath(path)} (epoch 1)"


def test_rewritten_checkpoint_loads_the_same(tmp_path, small_ckpt):
    path = save_pth(tmp_path / "same.pth", small_ckpt)
    _, a = load_checkpoint(path)
    _, b = load_checkpoint(require_golden("small_edsr_srno") / "checkpoint.pth")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_shape_mismatch(tmp_path, small_ckpt):
    args = dict(small_ckpt["model"]["args"], width=128, blocks=4)
    path = save_pth(tmp_path / "wide.pth", with_model(small_ckpt, args=args))
    with pytest.raises(
        CheckpointError,
        match=r"parameter conv\S+ has shape \(.*\), the model expects \(.*\); the checkpoint.s architecture",
    ):
        load_checkpoint(path)


def test_other_architecture(tmp_path, small_ckpt):
    args = dict(
        small_ckpt["model"]["args"], encoder_spec={"name": "rdn", "args": {"RDNconfig": "A"}}
    )
    path = save_pth(tmp_path / "rdn.pth", with_model(small_ckpt, args=args))
    with pytest.raises(CheckpointError, match=r"unknown parameter\(s\) \['encoder\.body"):
        load_checkpoint(path)


def test_missing_key(tmp_path, small_ckpt):
    sd = dict(small_ckpt["model"]["sd"])
    del sd["conv1.vln.bias"]
    path = save_pth(tmp_path / "missing.pth", with_model(small_ckpt, sd=sd))
    with pytest.raises(CheckpointError, match=r"missing parameter\(s\) \['conv1\.vln\.bias'\]"):
        load_checkpoint(path)


def test_not_an_srno_checkpoint(tmp_path, small_ckpt):
    with pytest.raises(CheckpointError, match="only 'sronet'"):
        load_checkpoint(save_pth(tmp_path / "liif.pth", with_model(small_ckpt, name="liif")))
    with pytest.raises(CheckpointError, match="not a reference SRNO checkpoint"):
        load_checkpoint(save_pth(tmp_path / "other.pth", {"state_dict": {}}))
    bad = dict(small_ckpt["model"]["args"], encoder_spec={"name": "swinir", "args": {}})
    with pytest.raises(CheckpointError, match="unknown encoder 'swinir'"):
        load_checkpoint(save_pth(tmp_path / "enc.pth", with_model(small_ckpt, args=bad)))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="checkpoint path None is not a path"):
        load_checkpoint(None)
    # A folder holding a .pth: the message names the file to give instead.
    with pytest.raises(
        CheckpointError, match=r"for the reference's checkpoint give the file, .*enc\.pth"
    ):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "encoder, args",
    [
        ("edsr-baseline", {"n_resblocks": 3}),
        ("edsr", {"n_resblocks": 2}),  # 256 features: a 4 * 258 + 2 = 1034-channel lifting
        ("rdn", {"RDNconfig": "A"}),
        ("rdn", {"RDNconfig": "B"}),
    ],
)
def test_torch_names_round_trip(encoder, args):
    """Every parameter has one torch name with the reference's shape, and maps back."""
    model = make_model(encoder, args, width=32, heads=4)
    params = jax.tree.map(
        lambda s: np.random.default_rng(0).standard_normal(s.shape).astype(np.float32),
        abstract_variables(model)["params"],
    )
    sd = params_to_torch(params, model)
    if encoder == "edsr":
        assert sd["conv00.weight"].shape == (32, 1034, 1, 1)
    assert all(v.ndim in (1, 3, 4) for v in sd.values())
    sd_extra = dict(sd, **{"encoder.sub_mean.weight": np.eye(3)[:, :, None, None]})
    if encoder == "rdn":  # some releases number the second GFF layer 2
        sd_extra = {k.replace("GFF.1.", "GFF.2."): v for k, v in sd_extra.items()}
    back = params_from_torch(sd_extra, model)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_a_layer_read_under_two_names_is_refused():
    """GFF.2 is read as GFF.1 (the naming of some releases); a file holding both has a
    layer this RDN lacks, which must not be dropped silently."""
    model = make_model("rdn", {"RDNconfig": "A"}, width=32, heads=4)
    params = jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), abstract_variables(model)["params"]
    )
    sd = params_to_torch(params, model)
    sd.update({k.replace("GFF.1.", "GFF.2."): v for k, v in sd.items() if "GFF.1." in k})
    with pytest.raises(CheckpointError, match=r"encoder\.GFF\.1\.\w+ and encoder\.GFF\.2"):
        params_from_torch(sd, model)


def test_non_finite_or_integer_weights_are_refused(tmp_path, small_ckpt):
    sd = dict(small_ckpt["model"]["sd"])
    sd["conv00.weight"] = np.array(sd["conv00.weight"], np.float32)
    sd["conv00.weight"][0, 0, 0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"lifting/kernel holds NaN"):
        load_checkpoint(save_pth(tmp_path / "nan.pth", with_model(small_ckpt, sd=sd)))
    model = load_checkpoint(require_golden("small_edsr_srno") / "checkpoint.pth")[0]
    ints = {k: np.asarray(v).astype(np.int64) for k, v in small_ckpt["model"]["sd"].items()}
    with pytest.raises(CheckpointError, match=r"is int64, not floating point"):
        params_from_torch(ints, model)


def test_refusal_message_shows_the_expected_layout(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(save_pth(tmp_path / "bare.pth", {"conv00.weight": np.zeros(3)}))
    assert "{'model': {'name', 'args', 'sd'}}" in str(e.value) and "}}}" not in str(e.value)
    assert "it holds a bare state dict (torch.save(model.state_dict()))" in str(e.value)


def test_a_data_parallel_state_dict_loads(tmp_path, small_ckpt):
    """A fine-tune saved from nn.DataParallel prefixes every key with 'module.'."""
    sd = {f"module.{k}": v for k, v in small_ckpt["model"]["sd"].items()}
    _, a = load_checkpoint(save_pth(tmp_path / "dp.pth", with_model(small_ckpt, sd=sd)))
    _, b = load_checkpoint(require_golden("small_edsr_srno") / "checkpoint.pth")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_float64_weights_beyond_float32_are_refused_as_such(small_ckpt):
    model = load_checkpoint(require_golden("small_edsr_srno") / "checkpoint.pth")[0]
    sd = {k: np.asarray(v, np.float64) for k, v in small_ckpt["model"]["sd"].items()}
    sd["conv00.weight"] = sd["conv00.weight"] * 0 + 1e39
    with pytest.raises(CheckpointError, match=r"conv00.weight \(float64\) exceeds float32's range"):
        params_from_torch(sd, model)


def test_home_is_expanded(tmp_path, monkeypatch, small_ckpt):
    save_pth(tmp_path / "ck.pth", small_ckpt)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_checkpoint("~/ck.pth")[0].width == load_checkpoint(tmp_path / "ck.pth")[0].width


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": "abc"}, "width = 'abc' is invalid"),
        ({"width": float("nan")}, "width = nan is invalid"),
        ({"width": float("inf")}, "width = inf is invalid"),
        ({"width": -64}, "width = -64 is invalid"),
        ({"blocks": 0}, "heads = 0 is invalid"),
        ({"encoder_spec": {"name": "edsr-baseline", "args": [1, 2]}}, "not a mapping"),
        ({"encoder_spec": {"name": "edsr-baseline", "args": {"n_feats": "64"}}}, "n_feats"),
        (
            {"encoder_spec": {"name": "edsr-baseline", "args": {"n_resblocks": 10**7}}},
            "<= 256|256]",
        ),
        (
            {"encoder_spec": {"name": "edsr-baseline", "args": {"res_scale": float("nan")}}},
            "res_scale",
        ),
        ({"encoder_spec": {"name": "rdn", "args": {"RDNkSize": 4}}}, "RDNkSize"),
        # The reference's SRNO(**args) takes no other argument and would fail.
        ({"heads": 8}, r"unknown model argument\(s\) \['heads'\]"),
        (
            {"encoder_spec": {"name": "edsr-baseline", "args": {"no_upsampling": False}}},
            "no_upsampling = False",
        ),
    ],
)
def test_model_args_out_of_range_are_refused_before_building(tmp_path, small_ckpt, change, message):
    """Corrupt or hostile args give one CheckpointError, not a JAX error or hours of tracing."""
    args = dict(small_ckpt["model"]["args"], **change)
    path = save_pth(tmp_path / "bad.pth", with_model(small_ckpt, args=args))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_state_dict_must_be_a_dict(tmp_path, small_ckpt):
    path = save_pth(tmp_path / "sd.pth", with_model(small_ckpt, sd=[1, 2]))
    with pytest.raises(CheckpointError, match="not a reference SRNO checkpoint"):
        load_checkpoint(path)


def test_encoder_args_that_only_shape_the_reference_tail_are_ignored(tmp_path, small_ckpt):
    """`scale` and `rgb_range` are arguments of the reference's make_edsr_baseline that
    change only its upsampling tail and an unused mean shift."""
    args = dict(small_ckpt["model"]["args"])
    args["encoder_spec"] = {
        "name": "edsr-baseline",
        "args": {"no_upsampling": True, "n_resblocks": 2, "scale": 4, "rgb_range": 1},
    }
    _, a = load_checkpoint(save_pth(tmp_path / "tail.pth", with_model(small_ckpt, args=args)))
    _, b = load_checkpoint(require_golden("small_edsr_srno") / "checkpoint.pth")
    jax.tree.map(np.testing.assert_array_equal, a, b)
