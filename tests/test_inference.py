"""Tests of srno_jax.inference: exact chunked prediction, tiled encoding, upscale."""

import jax
import numpy as np
import pytest
from conftest import SMALL_GOLDEN
from PIL import Image

from srno_jax.checkpoints import load_checkpoint
from srno_jax.coords import make_coord
from srno_jax.errors import ConfigError, DataError
from srno_jax.image_api import upscale
from srno_jax.inference import _encoder, _moments, _one_chunk, _project, encode, lr_bucket, predict
from srno_jax.models import init_variables, make_model

_GOLDEN = SMALL_GOLDEN


@pytest.fixture(scope="module")
def small():
    """(model, variables) of the golden small checkpoint."""
    return load_checkpoint(_GOLDEN / "checkpoint.pth")


def _case(name):
    with np.load(_GOLDEN / "cases.npz") as z:
        return (
            z[f"{name}/inp"].transpose(0, 2, 3, 1),
            z[f"{name}/coord"],
            z[f"{name}/cell"],
            z[f"{name}/pred"].transpose(0, 2, 3, 1),
        )


@pytest.mark.parametrize("name,chunks", [("grid_x2.5", (1000, 10**6)), ("grid_x7_mcell", (777,))])
def test_chunked_equals_one_pass_and_golden(small, name, chunks):
    model, variables = small
    inp, coord, cell, golden = _case(name)
    one_pass = np.asarray(model.apply(variables, inp, coord, cell))
    for chunk in chunks:  # N = 3000 and 5880: 1000 divides N, 777 does not, 10**6 > N
        out = predict(model, variables, inp, coord, cell, chunk_size=chunk)
        assert out.shape == one_pass.shape
        np.testing.assert_allclose(out, one_pass, atol=1e-5, rtol=0, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(out, golden, atol=1e-4, rtol=0, err_msg=f"chunk {chunk}")


def test_accelerators_take_larger_sub_chunks_with_the_same_result(small, monkeypatch):
    """On a GPU or TPU a pass walks ACCELERATOR_SUB_CHUNK queries a step, not the CPU's
    cache-sized SUB_CHUNK: the same prediction, from fewer and larger kernels."""
    from srno_jax import inference

    model, variables = small
    inp, coord, cell, _ = _case("grid_x2.5")
    on_cpu = predict(model, variables, inp, coord, cell)
    assert inference._chunk_len(3000, None) == (inference.MIN_CHUNK, inference.SUB_CHUNK)
    assert inference._chunk_len(4096**2, 70_000) == (70_000, 2_000)
    monkeypatch.setattr(inference.jax, "default_backend", lambda: "gpu")
    assert inference._chunk_len(3000, None) == (inference.MIN_CHUNK, inference.MIN_CHUNK)
    assert inference._chunk_len(3000, 1000) == (1000, 1000)
    # A chunk_size lowered to save memory is kept, in equal sub-chunks.
    assert inference._chunk_len(4096**2, 200_000) == (200_000, 50_000)
    assert inference._chunk_len(4096**2, None) == (2**18, 2**16)
    np.testing.assert_allclose(
        predict(model, variables, inp, coord, cell), on_cpu, atol=1e-5, rtol=0
    )


def test_lifting_table_equals_lifting_per_query(small, monkeypatch):
    """The lifting's 1x1 layer applied to the LR features before the gather (the default)
    and at each query (too large a table) give the same prediction."""
    from srno_jax import inference

    model, variables = small
    inp, coord, cell, _ = _case("grid_x7_mcell")
    by_table = predict(model, variables, inp, coord, cell, chunk_size=777)
    monkeypatch.setattr(inference, "MAX_TABLE_BYTES", 0)
    per_query = predict(model, variables, inp, coord, cell, chunk_size=777)
    np.testing.assert_allclose(by_table, per_query, atol=1e-5, rtol=0)
    assert np.abs(by_table - per_query).max() > 0  # two computations, not one


def test_tiled_encoder_equals_full(small):
    model, variables = small  # receptive radius 2 * 2 + 2 = 6: tiles need > 12 pixels
    inp = np.random.default_rng(0).uniform(-1, 1, (1, 40, 29, 3)).astype(np.float32)
    full = np.asarray(encode(model, variables, inp, tile=64))
    np.testing.assert_allclose(np.asarray(encode(model, variables, inp, tile=16)), full, atol=1e-5)
    with pytest.raises(ConfigError, match="receptive"):
        encode(model, variables, inp, tile=12)


def test_lr_bucket():
    assert [lr_bucket(n) for n in (1, 7, 9, 33, 64, 65, 100, 128, 129, 161, 300, 512)] == [
        1,
        8,
        12,
        48,
        64,
        96,
        128,
        128,
        160,
        192,
        320,
        512,
    ]


# Measured: EDSR's padded features are bit for bit the unpadded ones; RDN's differ in the
# last bit (XLA picks another loop order for its 1x1 fusions at another shape).
@pytest.mark.parametrize(
    "encoder,args,atol",
    [("edsr-baseline", {"n_resblocks": 2}, 0.0), ("rdn", {"G0": 8, "RDNconfig": "A"}, 1e-6)],
)
def test_padded_input_gives_the_unpadded_result(encoder, args, atol):
    """Odd LR sizes padded to their bucket: the features equal those of the unpadded
    input (the mask reproduces the zero padding at the true border; without it they
    differ near the border), and the prediction equals one-pass ``model.apply``
    on the unpadded input."""
    model = make_model(encoder, args, width=32, heads=4)
    variables = init_variables(model)
    for h, w in [(13, 9), (17, 21), (41, 23)]:
        assert (lr_bucket(h), lr_bucket(w)) != (h, w)  # padded on at least one axis
        inp = np.random.default_rng(h).uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
        unpadded = _encoder()(model, variables, inp, np.array([h, w], np.int32), None)
        np.testing.assert_allclose(encode(model, variables, inp), unpadded, atol=atol, rtol=0)
        hp, wp = lr_bucket(h), lr_bucket(w)
        padded = np.pad(inp, [(0, 0), (0, hp - h), (0, wp - w), (0, 0)])
        unmasked = _encoder()(model, variables, padded, np.array([hp, wp], np.int32), None)[
            :, :h, :w
        ]
        assert np.abs(unmasked - unpadded).max() > 1e-3
        size = (int(h * 2.7), int(w * 2.7))
        coord, cell = make_coord(size)[None], np.array([[2 / size[0], 2 / size[1]]], np.float32)
        one_pass = jax.jit(model.apply)(variables, inp, coord, cell)
        np.testing.assert_allclose(
            predict(model, variables, inp, coord, cell),
            one_pass,
            atol=1e-6,
            rtol=0,
            err_msg=f"{h}x{w}",
        )


def test_compiles_once_per_bucket_and_chunk(small):
    model, variables = small
    rng = np.random.default_rng(1)

    def run(h, w, out, chunk_size=None):
        inp = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
        cell = np.array([[2 / out[0], 2 / out[1]]], np.float32)
        predict(model, variables, inp, make_coord(out)[None], cell, chunk_size=chunk_size)

    def sizes():
        return (
            _encoder()._cache_size(),
            _moments._cache_size(),
            _project._cache_size(),
            _one_chunk._cache_size(),
        )

    run(9, 11, (30, 31), chunk_size=256)
    run(9, 11, (30, 31))
    before = sizes()
    assert all(n > 0 for n in before)  # each of the four is a cached jit
    run(10, 12, (41, 23), chunk_size=256)  # LR 9..12 x 9..12 share the bucket 12 x 12
    run(10, 11, (25, 26))
    run(9, 12, (60, 70))  # all these outputs fill one MIN_CHUNK chunk
    assert sizes() == before


def test_upscale_scale_size_and_modes(small):
    model, variables = small
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    out = upscale(model, variables, rgb, scale=2.5)
    assert out.shape == (30, 25, 3) and out.dtype == np.uint8
    assert upscale(model, variables, rgb, size=(17, 40)).shape == (17, 40, 3)
    assert upscale(model, variables, rgb[..., 0], scale=2.5).shape == (30, 25)
    rgba = np.dstack([rgb, np.full((12, 10), 200, np.uint8)])
    out4 = upscale(model, variables, rgba, scale=2.5)
    assert out4.shape == (30, 25, 4)
    np.testing.assert_array_equal(out4[..., :3], out)
    assert np.all(out4[..., 3] == 200)
    u16 = rgb[..., 0].astype(np.uint16) * 257
    np.testing.assert_array_equal(
        upscale(model, variables, u16, scale=2.5),
        upscale(model, variables, Image.fromarray(rgb[..., 0]), scale=2.5),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale=0), "scale"),
        (dict(scale=-2), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(scale=1), r"scale must be a finite number > 1"),
        (dict(scale=0.5), "> 1"),
        (dict(size=(0, 5)), "does not enlarge"),
        (dict(size=(3, 8)), "does not enlarge"),
        (dict(size=(4, 4)), "does not enlarge"),
        (dict(size=(5,)), "height, width"),
        (dict(scale=2, size=(4, 4)), "exactly one"),
        (dict(), "exactly one"),
        (dict(size=(100000, 100000)), "limit"),
        (dict(scale=2, chunk_size=0), "chunk_size"),
    ],
)
def test_upscale_bad_arguments(small, kwargs, match):
    model, variables = small
    with pytest.raises(ConfigError, match=match):
        upscale(model, variables, np.zeros((4, 4, 3), np.uint8), **kwargs)


def test_upscale_bad_image(small):
    with pytest.raises(DataError, match="expected"):
        upscale(*small, np.zeros((4, 4, 3), np.float32), scale=2)


def test_upscale_cli(small, tmp_path, capsys):
    from srno_jax.upscale_cli import main

    rgb = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    args = [
        str(tmp_path / "in.png"),
        str(out),
        "--checkpoint",
        str(_GOLDEN / "checkpoint.pth"),
        "--compilation_cache=",
    ]  # not the user's cache folder
    assert main([*args, "--size", "25x30"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), upscale(*small, rgb, scale=2.5))
    assert main([*args, "--scale", "-1"]) == 2
    assert main([str(tmp_path / "missing.png"), str(out), "--scale", "2", *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "scale must be a finite number > 1" in err and "image not found" in err
    assert "Traceback" not in err


def test_moments_are_the_layer_normed_sums(small):
    """`moments` centres the k and v projections' columns in place of the LayerNorm's
    mean; it equals sum_n LN(k_n)^T LN(v_n) over the unmasked points, LN as the
    reference writes it (mean subtracted, unbiased std, eps added to the std)."""
    model, variables = small
    params = jax.tree.map(np.asarray, variables["params"])
    rng = np.random.default_rng(0)
    for name in ("k_norm", "v_norm"):  # an affine map far from the identity
        norm = params["kernel_integrals_0"][name]
        norm["scale"] = rng.uniform(0.5, 2.0, norm["scale"].shape).astype(np.float32)
        norm["bias"] = rng.normal(0, 1, norm["bias"].shape).astype(np.float32)
    width, heads = model.width, model.heads
    d = width // heads
    z = rng.normal(0, 1, (2, 37, width)).astype(np.float32)
    mask = (rng.uniform(size=(2, 37)) < 0.7).astype(np.float32)

    def layer_norm(x, p):  # the reference: unbiased std, eps added to the std
        mean = x.mean(-1, keepdims=True)
        std = np.sqrt(((x - mean) ** 2).sum(-1, keepdims=True) / (d - 1))
        return (x - mean) / (std + 1e-5) * p["scale"] + p["bias"]

    p = params["kernel_integrals_0"]
    qkv = (z @ p["qkv_proj"]["kernel"] + p["qkv_proj"]["bias"]).reshape(2, 37, heads, 3 * d)
    k = layer_norm(qkv[..., d : 2 * d], p["k_norm"]) * mask[..., None, None]
    v = layer_norm(qkv[..., 2 * d :], p["v_norm"])
    want = np.einsum("bnhd,bnhe->bhde", k.astype(np.float64), v)
    got = model.apply(
        {"params": params}, z, mask, method=lambda m, z, mk: m.kernel_integrals[0].moments(z, mk)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_queries_that_do_not_fit_the_input_are_refused_by_apply_and_predict(small):
    """A make_coord grid without [None] broadcast against a batch of one and gave an image
    of the right shape, each row integrated over its own 48 queries; uint8 input gave
    values up to 274."""
    model, variables = small
    inp = np.random.default_rng(0).uniform(-1, 1, (1, 20, 24, 3)).astype(np.float32)
    coord, cell = make_coord((40, 48)), np.full((1, 2), 2 / 40, np.float32)
    bad = [
        ((inp, coord, cell), "coord must be \\(B, ..., 2\\) with inp's batch B = 1"),
        ((inp, coord[None].repeat(2, 0), cell), "coord must be"),
        ((inp, coord[None], cell[0]), "cell must be \\(B, 2\\)"),
        ((inp, coord[None], cell[:, None]), "cell must be"),
        ((inp.transpose(0, 3, 1, 2), coord[None], cell), "inp must be \\(B, h, w, 3\\)"),
        ((np.uint8(inp * 127 + 128), coord[None], cell), "inp is uint8; .*normalise"),
    ]
    for args, message in bad:
        with pytest.raises(DataError, match=message):
            model.apply(variables, *args)
        with pytest.raises(DataError, match=message):
            predict(model, variables, *args)
    with pytest.raises(DataError, match="coord must be"):  # checked while tracing, too
        jax.jit(model.apply)(variables, inp, coord, cell)


def test_predict_refuses_variables_of_another_model_and_bad_tiles(small):
    model, variables = small
    inp = np.zeros((1, 8, 8, 3), np.float32)
    coord, cell = make_coord((16, 16))[None], np.full((1, 2), 2 / 16, np.float32)
    other = make_model(encoder_args={"n_resblocks": 1, "n_feats": 8}, width=16, heads=2)
    with pytest.raises(ConfigError, match="the variables do not fit the model"):
        predict(other, variables, inp, coord, cell)
    integer = jax.tree.map(lambda x: np.asarray(x).astype(np.int32), variables)
    with pytest.raises(ConfigError, match="is int32, not floating point"):
        predict(model, integer, inp, coord, cell)
    with pytest.raises(ConfigError, match="variables must be"):
        predict(model, variables["params"], inp, coord, cell)
    for tile in (None, "64", 50.5, 0):
        with pytest.raises(ConfigError, match="tile must be a positive integer"):
            predict(model, variables, inp, coord, cell, tile=tile)


@pytest.mark.parametrize("dtype", ["float8", "int32", None, "float64x"])
def test_make_model_refuses_dtypes_that_are_not_floating_point(dtype):
    with pytest.raises(ConfigError, match="not a floating-point type"):
        make_model(dtype=dtype)


def test_make_coord_refuses_empty_or_fractional_sizes():
    for shape in [(0, 5), (4, 2.5), (-1,)]:
        with pytest.raises(ConfigError, match="whole numbers >= 1"):
            make_coord(shape)
