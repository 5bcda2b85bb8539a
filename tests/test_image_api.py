"""The image-level API and image I/O: sizes, EXIF orientation, PIL's pixel limit, formats."""

import os
import re
import zlib

import numpy as np
import pytest
from PIL import Image

from srno_jax.errors import ConfigError, DataError
from srno_jax.image_api import output_size, upscale
from srno_jax.images import (
    check_savable,
    fill_hidden,
    load_image,
    open_image,
    output_format,
    save_image,
)


@pytest.fixture(scope="module")
def tiny():
    from srno_jax.models import init_variables, make_model

    model = make_model(encoder_args={"n_resblocks": 1, "n_feats": 8}, width=16, heads=2)
    return model, init_variables(model)


@pytest.mark.parametrize("hw,scale", [((64, 64), 1.0001), ((64, 64), 1.007), ((3, 5), 1.09)])
def test_a_scale_that_keeps_the_size_is_refused(hw, scale):
    with pytest.raises(ConfigError, match="after rounding; give a larger scale"):
        output_size(hw, scale, None)


def test_a_scale_that_changes_one_side_is_accepted():
    assert output_size((64, 1000), 1.001, None) == (64, 1001)
    assert output_size((64, 64), 1.01, None) == (65, 65)


@pytest.mark.parametrize(
    "scale,message",
    [
        (1e308, "output 1.20e+309x1.60e+309 (width x height) has 1.92e+618 pixels"),
        (1e200, "output 1.20e+201x1.60e+201 (width x height) has 1.92e+402 pixels"),
        (1200, "output 14400x19200 (width x height) has 276480000 pixels"),
    ],
)
def test_a_too_large_output_is_one_readable_line(scale, message):
    with pytest.raises(ConfigError) as e:
        output_size((16, 12), scale, None)  # 1e308 * 16 is a float overflow
    assert message in str(e.value) and "more than the limit 134217728" in str(e.value)
    assert len(str(e.value)) < 200


def test_sizes_are_written_width_x_height():
    with pytest.raises(
        ConfigError, match=r"size 0x100 \(width x height\) does not enlarge the 12x16"
    ):
        output_size((16, 12), None, (100, 0))
    with pytest.raises(ConfigError, match=r"the 1000x64 \(width x height\) input at 1000x64"):
        output_size((64, 1000), 1.0001, None)


@pytest.mark.parametrize(
    "orientation,upright",
    [
        (1, lambda a: a),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, -1)),
        (8, lambda a: np.rot90(a)),
    ],
)
def test_upscale_applies_exif_orientation(tiny, tmp_path, orientation, upright):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "p.png", exif=exif)
    expected = upscale(*tiny, np.ascontiguousarray(upright(rgb)), scale=2)
    with Image.open(tmp_path / "p.png") as img:  # a PIL input, as a user opens it
        np.testing.assert_array_equal(upscale(*tiny, img, scale=2), expected)
    np.testing.assert_array_equal(
        np.asarray(open_image(tmp_path / "p.png", orient=True)), upright(rgb)
    )
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "p.png")), rgb)


def png_header(width, height):
    """The bytes of a PNG whose header claims width x height RGB pixels (and holds none)."""

    def chunk(kind, data):
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [60000, 10000])  # PIL's error (> 2x its limit) and its warning
def test_decompression_bomb_is_a_data_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(DataError, match=f"refusing {path}: .*MAX_IMAGE_PIXELS"):
        open_image(path)


@pytest.mark.parametrize(
    "mode,shape", [("L", (5, 7)), ("LA", (5, 7, 2)), ("RGB", (5, 7, 3)), ("RGBA", (5, 7, 4))]
)
@pytest.mark.parametrize(
    "ext,modes",
    [
        (".png", {}),
        (".tiff", {}),
        (".jpg", {"LA": "L", "RGBA": "RGB"}),  # no alpha
        (".bmp", {"LA": "L", "RGBA": "RGB"}),
        (".webp", {"L": "RGB", "LA": "RGBA"}),  # no grayscale
    ],
)
def test_save_image_by_extension(tmp_path, mode, shape, ext, modes):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    save_image(tmp_path / f"x{ext}", a)
    with Image.open(tmp_path / f"x{ext}") as img:
        assert img.format == output_format(f"x{ext}") and img.size == (7, 5)
        assert img.mode == modes.get(mode, mode)
        if ext in (".png", ".tiff"):
            np.testing.assert_array_equal(np.asarray(img), a)
    assert os.listdir(tmp_path) == [f"x{ext}"]


@pytest.fixture(scope="module")
def icc():
    """ICC profiles' bytes by colour space: PIL's sRGB with its header's space replaced."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return {space: srgb[:16] + space + srgb[20:] for space in (b"RGB ", b"GRAY", b"CMYK")}


@pytest.mark.parametrize("mode,shape", [("L", (5, 7)), ("LA", (5, 7, 2)), ("RGBA", (5, 7, 4))])
@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif", ".bmp"])
def test_save_image_embeds_an_icc_profile_that_fits(tmp_path, icc, mode, shape, ext):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    fits = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "LA": b"GRAY"}
    for space, profile in icc.items():
        save_image(tmp_path / f"x{ext}", a, icc_profile=profile)
        with Image.open(tmp_path / f"x{ext}") as img:
            # The mode written decides (WebP writes gray as RGB); BMP holds no profile.
            kept = fits[img.mode] == space and ext != ".bmp"
            assert img.info.get("icc_profile") == (profile if kept else None), space


@pytest.mark.parametrize(
    "name,hw,message",
    [
        ("x.webp", (1, 16384), "at most 16383 pixels a side"),
        ("x.jpg", (65501, 1), "at most 65500 pixels a side"),
        ("a" * 243 + ".png", (1, 1), "choose a shorter name"),  # no room for ".NAME.partial"
    ],
)
def test_save_image_refuses_what_the_format_cannot_hold(tmp_path, name, hw, message):
    with pytest.raises(ConfigError, match=message):
        check_savable(tmp_path / name, hw)
    with pytest.raises(ConfigError, match=message):
        save_image(tmp_path / name, np.zeros(hw, np.uint8))
    assert os.listdir(tmp_path) == []
    assert check_savable(tmp_path / "x.webp", (16383, 16383)) == "WEBP"
    assert check_savable(tmp_path / "x.png", (1, 100000)) == "PNG"
    assert check_savable(tmp_path / ("a" * 242 + ".png"), (1, 1)) == "PNG"


def _mode(mode):
    """A 6x9 image of `mode` from random RGBA (a palette one with a transparent colour)."""
    rgba = np.random.default_rng(2).integers(0, 256, (6, 9, 4), dtype=np.uint8)
    img = Image.fromarray(rgba)
    if mode == "P+transparency":
        img = img.convert("RGB").convert("P")
        img.info["transparency"] = 0
        return img
    return img.convert(mode)


@pytest.mark.parametrize(
    "mode,shape",
    [
        ("1", (12, 18)),
        ("L", (12, 18)),
        ("LA", (12, 18, 2)),
        ("La", (12, 18, 2)),
        ("RGB", (12, 18, 3)),
        ("RGBa", (12, 18, 4)),
        ("PA", (12, 18, 4)),
        ("P+transparency", (12, 18, 4)),
        ("LAB", (12, 18, 3)),
        ("HSV", (12, 18, 3)),
        ("CMYK", (12, 18, 3)),
    ],
)
def test_grayscale_and_alpha_follow_the_mode(tiny, mode, shape):
    assert upscale(*tiny, _mode(mode), scale=2).shape == shape


def test_a_16_bit_png_keeps_its_transparent_value(tiny, tmp_path):
    """PIL's I;16 -> RGBA ignores the PNG's transparency key: the mask comes from the key."""
    gray = np.full((16, 16), 40000, np.uint16)
    gray[:, :8] = 1234
    Image.fromarray(gray).save(tmp_path / "k.png", transparency=1234)
    out = upscale(*tiny, open_image(tmp_path / "k.png"), scale=2)
    assert out.shape == (32, 32, 2)
    assert (out[:, :12, 1] == 0).all() and (out[:, -12:, 1] == 255).all()


def test_16_bit_is_scaled_and_32_bit_is_refused(tiny, tmp_path):
    gray = np.random.default_rng(3).integers(0, 256, (6, 9), dtype=np.uint8)
    np.testing.assert_array_equal(
        upscale(*tiny, gray.astype(np.uint16) * 257, scale=2), upscale(*tiny, gray, scale=2)
    )
    for array, kind in [
        (gray.astype(np.float32), "32-bit float"),  # 0..255, once read as 0..1: white
        (np.full((6, 9), np.nan, np.float32), "32-bit float"),
        (gray.astype(np.int32), "32-bit integer"),  # 0..255, once read as 0..65535: black
    ]:
        with pytest.raises(DataError, match=f"{kind} image .*convert it to 8-bit or 16-bit"):
            upscale(*tiny, Image.fromarray(array), scale=2)
        Image.fromarray(array).save(tmp_path / "x.tif")
        with pytest.raises(DataError, match=f"{tmp_path / 'x.tif'} is a {kind} image"):
            load_image(tmp_path / "x.tif")


def test_output_format_refuses_unknown_extensions():
    assert output_format("a/B.JPEG") == "JPEG"
    for name in ("out.xyz", "out", "out.gif"):
        with pytest.raises(ConfigError, match="end the name with one of .png"):
            output_format(name)


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(b"precious")

    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(DataError, match="cannot write .*No space left"):
        save_image(path, np.zeros((4, 4, 3), np.uint8))
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["x.png"]


def test_16_bit_png_opened_as_mode_i_is_16_bit():
    """Older Pillow opens a 16-bit grayscale PNG as mode 'I': it is scaled like 'I;16'."""
    from srno_jax.images import to_rgb_uint8

    a = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    as_i = Image.fromarray(a).convert("I")
    as_i.format = "PNG"
    np.testing.assert_array_equal(to_rgb_uint8(as_i), to_rgb_uint8(Image.fromarray(a)))
    as_i.format = "TIFF"  # a TIFF can hold 32-bit samples: refused
    with pytest.raises(DataError, match="32-bit integer"):
        to_rgb_uint8(as_i)


def test_variables_of_another_model_are_refused(tiny):
    """Flax applies a model to a larger model's parameters, or to a mistyped tree, without
    an error of its own: the image API checks the pair first."""
    from srno_jax.image_api import super_resolve
    from srno_jax.models import init_variables, make_model

    model, variables = tiny
    bigger = make_model(encoder_args={"n_resblocks": 2, "n_feats": 8}, width=16, heads=2)
    rgb = np.zeros((6, 5, 3), np.uint8)
    cases = [
        (model, init_variables(bigger), "params['encoder']['block_1']['conv_0']['bias'] is not"),
        (bigger, variables, "params['encoder']['block_1']['conv_0']['bias'] is missing"),
        (model, variables["params"], "pass the whole variables, not variables['params']"),
        (None, variables, "model is a NoneType, not an SRNO"),
    ]
    for m, v, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            upscale(m, v, rgb, scale=2)
    wide = make_model(encoder_args={"n_resblocks": 1, "n_feats": 8}, width=32, heads=2)
    with pytest.raises(
        ConfigError, match=r"\['k_norm'\]\['bias'\] has shape \(2, 8\), the model's \(2, 16\)"
    ):
        super_resolve(wide, variables, rgb, (12, 10), 2.0)


@pytest.mark.parametrize(
    "lr", [np.zeros((6, 5, 3)), np.zeros((6, 5, 3), np.uint16), np.zeros((6, 5), np.uint8)]
)
def test_super_resolve_takes_uint8_rgb_only(tiny, lr):
    """A float image in [0, 1] would come out black, a 16-bit one white, without a word."""
    from srno_jax.image_api import super_resolve

    with pytest.raises(DataError, match="lr must be a uint8 \\(h, w, 3\\) RGB array"):
        super_resolve(*tiny, lr, (12, 10), 2.0)


@pytest.mark.parametrize("ext", [".tif", ".gif", ".webp"])
def test_a_multi_frame_file_reads_as_its_first_frame_where_allowed(tmp_path, ext):
    """Evaluation and training read frame 0 (srno-upscale refuses such files instead)."""
    frames = [Image.fromarray(np.full((6, 5, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / f"two{ext}", save_all=True, append_images=frames[1:])
    first = load_image(tmp_path / f"two{ext}")
    assert first.shape == (6, 5, 3) and abs(int(first.mean()) - 10) <= 2


def test_the_readmes_python_example_runs_and_keeps_the_colour_profile(tmp_path, monkeypatch, icc):
    """The README's "From Python or a notebook" block, as written, on the shipped demo
    model and a small JPEG with a colour profile."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("From Python or a notebook:", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0]
    checkpoint = str(ROOT / "examples" / "assets" / "demo_srno")
    assert '"edsr-baseline_epoch-1000.pth"' in code
    code = code.replace('"edsr-baseline_epoch-1000.pth"', repr(checkpoint))
    rgb = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", icc_profile=icc[b"RGB "])
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["pred"].shape == (1, 44, 44, 3)
    with Image.open(tmp_path / "photo_x3.7.png") as out:
        assert out.size == (44, 44)
        assert out.info.get("icc_profile") == icc[b"RGB "]


def test_non_finite_variables_are_an_error_not_a_black_image(tiny):
    """Variables edited in a notebook (load_checkpoint refuses such files) that predict
    NaN: clipping would have turned the prediction into zeros."""
    import jax

    model, variables = tiny
    broken = jax.tree.map(lambda x: x, variables)
    broken["params"]["projection"]["fc2"]["bias"] = broken["params"]["projection"]["fc2"][
        "bias"
    ] * float("nan")
    with pytest.raises(ConfigError, match="prediction holds NaN or infinite values"):
        upscale(model, broken, np.zeros((6, 5, 3), np.uint8), scale=2)


@pytest.mark.parametrize("img", [np.full((4, 4, 3), 0.5), np.full((4, 4, 3), 300, np.uint16)])
def test_save_image_refuses_what_a_cast_would_change(tmp_path, img):
    """A float image in [0, 1] was written black, a 16-bit one wrapped around."""
    with pytest.raises(ConfigError, match=rf"uint8 image, got {img.dtype}; convert"):
        save_image(tmp_path / "x.png", img)
    assert not os.listdir(tmp_path)


def test_scales_and_sizes_of_numpy_and_jax_types(tiny):
    import fractions

    import jax.numpy as jnp

    for scale in (jnp.float32(2.5), np.float64(2.5), np.array(2.5), fractions.Fraction(5, 2)):
        assert output_size((6, 5), scale, None) == (15, 12), scale
    assert output_size((6, 5), None, np.array([15, 12])) == (15, 12)
    for bad in (jnp.array([2.5]), np.bool_(True), 2.5j, "2"):
        with pytest.raises(ConfigError, match="scale must be a finite number > 1"):
            output_size((6, 5), bad, None)
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        upscale(*tiny, rgb, scale=jnp.float32(2.5)), upscale(*tiny, rgb, scale=2.5)
    )


@pytest.mark.parametrize(
    "image",
    [Image.new("RGB", (0, 3)), np.zeros((0, 3, 3), np.uint8), np.zeros((3, 3, 5), np.uint8)],
)
def test_an_empty_or_misshapen_image_is_a_data_error(tiny, image):
    """An empty PIL crop at an image's edge, as its array, and five channels."""
    with pytest.raises(DataError, match="empty|got uint8 of shape"):
        upscale(*tiny, image, size=(4, 4))


def test_save_image_takes_one_channel_and_refuses_other_shapes(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (5, 7, 1), dtype=np.uint8)
    save_image(tmp_path / "x.png", a)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), a[..., 0])
    for shape in [(5, 7, 5), (5,), (0, 7, 3)]:
        with pytest.raises(ConfigError, match=r"\(H, W\) or \(H, W, 1\|2\|3\|4\) image"):
            save_image(tmp_path / "y.png", np.zeros(shape, np.uint8))
    assert os.listdir(tmp_path) == ["x.png"]


def test_the_colour_under_transparency_does_not_show(tiny):
    """A logo's transparent surround is often stored black: upscaled as it is, it left
    a dark fringe round the visible edge. The visible result must not depend on it."""
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 5**2
    black = np.zeros((16, 16, 4), np.uint8)
    black[disc] = (200, 30, 90, 255)
    white = black.copy()
    white[~disc, :3] = 255
    out = upscale(*tiny, Image.fromarray(black, "RGBA"), scale=3)
    np.testing.assert_array_equal(out, upscale(*tiny, Image.fromarray(white, "RGBA"), scale=3))
    assert out.shape == (48, 48, 4)


def test_fill_hidden_takes_the_nearest_visible_colour():
    rgb = np.arange(5 * 3, dtype=np.uint8).reshape(1, 5, 3) * 10
    alpha = np.array([[0, 255, 0, 0, 128]], np.uint8)
    got = fill_hidden(rgb, alpha)
    np.testing.assert_array_equal(got[0, [0, 1, 2, 3, 4]], rgb[0, [1, 1, 1, 4, 4]])
    assert fill_hidden(rgb, np.zeros_like(alpha)) is rgb  # nothing visible to take from
