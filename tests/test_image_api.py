"""The image-level API and image I/O: sizes, EXIF orientation, PIL's pixel limit, formats."""

import os
import zlib

import numpy as np
import pytest
from PIL import Image

from srno_jax.errors import ConfigError, DataError
from srno_jax.image_api import output_size, upscale
from srno_jax.images import open_image, output_format, save_image


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
@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tiff", ".bmp"])
def test_save_image_by_extension(tmp_path, mode, shape, ext):
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    save_image(tmp_path / f"x{ext}", a)
    with Image.open(tmp_path / f"x{ext}") as img:
        assert img.format == output_format(f"x{ext}") and img.size == (7, 5)
        if ext in (".png", ".tiff"):
            assert img.mode == mode
            np.testing.assert_array_equal(np.asarray(img), a)
        if ext in (".jpg", ".bmp"):  # no alpha there
            assert img.mode == mode.rstrip("A")
    assert os.listdir(tmp_path) == [f"x{ext}"]


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
