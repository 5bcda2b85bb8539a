"""Tests of srno_jax.pairs: the two paired layouts, scales read from sizes, clear errors."""

import numpy as np
import pytest
from PIL import Image

from srno_jax.errors import DataError
from srno_jax.pairs import Pair, find_pairs, pair_images, pair_scale


def save(path, hw, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


def test_pair_scale_rules():
    assert pair_scale((64, 80), (16, 20)) == 4.0
    assert pair_scale((100, 90), (40, 36)) == 2.5
    assert pair_scale((33, 48), (11, 16)) == 3.0
    assert pair_scale((90, 101), (36, 40), nominal=2.5) == 2.5
    assert pair_scale((10, 10), (10, 10)) == 1.0
    # LR sets made from an HR image cropped to a multiple of the scale (B100's 321 x 481 at
    # x4, Set5's 512^2 baby at x3): the whole number, as the reference's paired loader.
    assert pair_scale((321, 481), (80, 120)) == 4
    assert pair_scale((512, 512), (170, 170)) == 3
    assert pair_scale((321, 481), (80, 120), nominal=4.0) == 4.0
    assert pair_scale((101, 90), (40, 36), nominal=2.5) == 2.5
    # LR sides rounded up (51.5 -> 52, 49.5 -> 50): x2, not "no whole number".
    assert pair_scale((103, 99), (52, 50)) == 2.0
    assert pair_scale((103, 103), (52, 52)) == 2.0  # not the exact ratio 103 / 52
    # Rounded up where half-to-even rounds down (60.5 -> 61, 62.5 -> 63), as MATLAB's
    # imresize sizes its output.
    assert pair_scale((121, 179), (61, 90)) == 2.0
    assert pair_scale((125, 125), (63, 63)) == 2.0
    assert pair_scale((121, 179), (61, 90), nominal=2.0) == 2.0
    # One rule for both axes: 21 / 4 floored is 5, 21 / 4 rounded up 6.
    with pytest.raises(DataError, match="no single scale"):
        pair_scale((21, 21), (5, 6))
    # 37 / 4 rounded up is 10, as MATLAB sizes x4: the whole number wins over the exact
    # x3.7, as everywhere; an X3.7/ folder says otherwise.
    assert pair_scale((37, 37), (10, 10)) == 4.0
    assert pair_scale((37, 37), (10, 10), nominal=3.7) == 3.7
    with pytest.raises(DataError, match=r"do not fit x3: HR 48x48, LR 24x24 \(H x W\) are x2"):
        pair_scale((48, 48), (24, 24), nominal=3.0)
    with pytest.raises(
        DataError, match=r"no single scale \(a\.png and b\.png\).*x4 vertically and x5"
    ):
        pair_scale((64, 80), (16, 16), "a.png and b.png")
    with pytest.raises(DataError, match="swapped"):
        pair_scale((16, 20), (64, 80))


@pytest.mark.parametrize(
    "hr,lr,scale",
    [
        ((50, 60), (13, 16), 3.7),  # x3.7 floored; 60 / 16 = x3.75 would fit as well
        ((45, 52), (12, 14), 3.7),
        ((101, 90), (40, 36), 2.5),  # one spare HR row: x2.5, or x2.525 rounded
    ],
)
def test_a_non_integer_scale_that_the_sizes_leave_open_needs_its_folder(hr, lr, scale):
    """Several non-integer scales fit these sizes and crop the HR image differently
    (x3.75 would score the reference's x3.7 pair 4 dB low): refused, naming the fix; the
    scale's X<s> folder gives it."""
    with pytest.raises(DataError, match=r"cannot be told from the sizes.*X3\.7/ for x3\.7"):
        pair_scale(hr, lr, "a.png and b.png")
    assert pair_scale(hr, lr, nominal=scale) == scale


def test_hr_lr_layout_with_non_integer_scale(tmp_path):
    hr_a = save(tmp_path / "HR" / "a.png", (100, 90), 1)  # exactly x2.5 on both axes
    save(tmp_path / "LR" / "a.png", (40, 36), 2)
    save(tmp_path / "HR" / "b.png", (48, 64), 3)  # x4
    lr_b = save(tmp_path / "LR" / "bx4.png", (12, 16), 4)
    (tmp_path / "notes.txt").write_text("not an image")
    for sub in ("HR", "LR"):  # macOS AppleDouble files: no partner needed, never read
        (tmp_path / sub / "._a.png").write_bytes(b"\x00\x05\x16\x07 metadata")
    pairs = find_pairs(tmp_path)
    assert pairs == [
        Pair("a", str(tmp_path / "HR" / "a.png"), str(tmp_path / "LR" / "a.png"), 2.5),
        Pair("b", str(tmp_path / "HR" / "b.png"), str(tmp_path / "LR" / "bx4.png"), 4.0),
    ]
    lr, hr = pair_images(pairs[0])
    assert lr.shape == (40, 36, 3) and lr.dtype == np.uint8
    np.testing.assert_array_equal(hr, hr_a)
    lr, hr = pair_images(pairs[1])
    np.testing.assert_array_equal(lr, lr_b)
    assert hr.shape == (48, 64, 3)


def test_div2k_layout(tmp_path):
    for i, stem in enumerate(["0801", "0802"]):
        save(tmp_path / "HR" / f"{stem}.png", (48, 72), i)
        save(tmp_path / "X2" / f"{stem}x2.png", (24, 36), i)
        save(tmp_path / "X3" / f"{stem}x3.png", (16, 24), i)
    save(tmp_path / "X4" / "0801.png", (12, 18))  # the HR's own stem works too
    save(tmp_path / "X4" / "0802x4.png", (12, 18))
    (tmp_path / "other").mkdir()  # not an LR folder: ignored
    pairs = find_pairs(tmp_path)
    assert [(p.name, p.scale) for p in pairs] == [
        ("X2/0801", 2.0),
        ("X2/0802", 2.0),
        ("X3/0801", 3.0),
        ("X3/0802", 3.0),
        ("X4/0801", 4.0),
        ("X4/0802", 4.0),
    ]
    assert pairs[2].lr_path.endswith("0801x3.png") and pairs[2].hr_path.endswith("0801.png")
    lr, hr = pair_images(pairs[2])
    assert lr.shape == (16, 24, 3) and hr.shape == (48, 72, 3)


def test_two_lr_images_of_one_hr_image_are_refused(tmp_path):
    """im0.png and im0x2.png in one LR folder: scoring both would count im0 twice."""
    save(tmp_path / "HR" / "im0.png", (16, 16))
    save(tmp_path / "LR" / "im0.png", (8, 8))
    save(tmp_path / "LR" / "im0x2.png", (8, 8))
    with pytest.raises(DataError, match=r"two images in .*LR pair with .*im0\.png: im0\.png and"):
        find_pairs(tmp_path)


def test_a_pair_stored_turned_differently_is_refused(tmp_path):
    """A phone's HR JPEG stored sideways with an EXIF orientation, its LR made from the
    upright view: read as stored (as the reference does) they are not aligned."""
    rng = np.random.default_rng(0)
    hr = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    (tmp_path / "HR").mkdir()
    (tmp_path / "LR").mkdir()
    hr.save(tmp_path / "HR" / "a.jpg", exif=exif)
    hr.resize((8, 8)).save(tmp_path / "LR" / "a.jpg")
    with pytest.raises(
        DataError, match=r"a\.jpg are stored turned differently .*orientation 6 and 1"
    ):
        find_pairs(tmp_path)
    hr.resize((8, 8)).save(tmp_path / "LR" / "a.jpg", exif=exif)  # both as stored: aligned
    assert find_pairs(tmp_path)[0].scale == 4


def test_not_a_paired_layout(tmp_path):
    assert find_pairs(tmp_path) is None
    save(tmp_path / "img.png", (8, 8))
    assert find_pairs(tmp_path) is None
    save(tmp_path / "HR" / "a.png", (8, 8))
    assert find_pairs(tmp_path) is None  # HR/ without any LR folder


def test_mismatched_size_names_the_files(tmp_path):
    save(tmp_path / "HR" / "a.png", (64, 80))
    save(tmp_path / "LR" / "a.png", (16, 30))
    with pytest.raises(DataError, match=r"no single scale .*HR.a\.png and .*LR.a\.png"):
        find_pairs(tmp_path)


def test_scale_folder_must_match_sizes(tmp_path):
    save(tmp_path / "HR" / "a.png", (48, 48))
    save(tmp_path / "X3" / "ax3.png", (24, 24))
    with pytest.raises(DataError, match=r"ax3\.png\) do not fit x3: .* are x2 apart; move"):
        find_pairs(tmp_path)


@pytest.mark.parametrize("folder", ["X0", "X0.5"])
def test_a_scale_folder_below_one_is_refused(tmp_path, folder):
    save(tmp_path / "HR" / "a.png", (8, 8))
    save(tmp_path / folder / "ax0.png", (8, 8))
    with pytest.raises(DataError, match=rf"{folder} names x0(\.5)?, a scale below 1"):
        find_pairs(tmp_path)


def test_a_pair_cropped_to_a_whole_scale_scores_on_that_grid(tmp_path):
    """HR 29 x 41 with its 7 x 10 LR at x4 (from HR[:28, :40]): the HR grid is 28 x 40."""
    save(tmp_path / "HR" / "a.png", (29, 41), 1)
    save(tmp_path / "X4" / "ax4.png", (7, 10), 2)
    (pair,) = find_pairs(tmp_path)
    lr, hr = pair_images(pair)
    assert pair.scale == 4 and lr.shape == (7, 10, 3) and hr.shape == (28, 40, 3)


def test_missing_partners(tmp_path):
    save(tmp_path / "HR" / "a.png", (16, 16))
    save(tmp_path / "LR" / "a.png", (8, 8))
    save(tmp_path / "LR" / "orphan.png", (8, 8))
    with pytest.raises(
        DataError,
        match=r"1 image\(s\) in .*LR have no partner in .*HR: "
        r"orphan\.png",
    ):
        find_pairs(tmp_path)
    (tmp_path / "LR" / "orphan.png").unlink()
    save(tmp_path / "HR" / "lonely.png", (16, 16))
    with pytest.raises(DataError, match=r"in .*HR have no partner in .*LR: lonely\.png"):
        find_pairs(tmp_path)


def test_empty_and_duplicate_stems(tmp_path):
    (tmp_path / "HR").mkdir()
    (tmp_path / "LR").mkdir()
    with pytest.raises(DataError, match="no images in the paired folder"):
        find_pairs(tmp_path)
    save(tmp_path / "HR" / "a.png", (16, 16))
    save(tmp_path / "HR" / "a.bmp", (16, 16))
    with pytest.raises(DataError, match="two images with the stem 'a'"):
        find_pairs(tmp_path)


def test_pair_changed_or_unreadable(tmp_path):
    save(tmp_path / "HR" / "a.png", (16, 16))
    save(tmp_path / "LR" / "a.png", (8, 8))
    (pair,) = find_pairs(tmp_path)
    save(tmp_path / "LR" / "a.png", (4, 4))
    with pytest.raises(DataError, match="changed size"):
        pair_images(pair)
    (tmp_path / "LR" / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"cannot read image .*a\.png") as e:
        find_pairs(tmp_path)
    assert str(e.value) == (
        f"cannot read image {tmp_path / 'LR' / 'a.png'}: PIL does not recognise it as an "
        "image; is it a complete image file?"
    )  # the path, not PIL's <_io.BufferedReader ...>


def test_paired_folder_trains(tmp_path):
    """A paired folder (x2 and x2.5 pairs, LR made by a box filter rather than bicubic)
    trains the tiny model end to end: the loss falls."""
    from test_train import assert_loss_falls, tiny_config

    yy, xx = np.mgrid[0:40, 0:50] / 50.0
    for i in range(4):
        img = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), np.sin(xx * yy * 4 + i)], -1)
        hr = Image.fromarray(((img * 0.5 + 0.5) * 255).astype(np.uint8))
        (tmp_path / "HR").mkdir(exist_ok=True)
        (tmp_path / "LR").mkdir(exist_ok=True)
        hr.save(tmp_path / "HR" / f"{i}.png")
        lr_size = (20, 16) if i % 2 else (25, 20)  # (W, H): x2.5 and x2
        hr.resize(lr_size, Image.BOX).save(tmp_path / "LR" / f"{i}.png")
    assert sorted(p.scale for p in find_pairs(tmp_path)) == [2.0, 2.0, 2.5, 2.5]
    assert type(assert_loss_falls(tiny_config(tmp_path))).__name__ == "PairedSource"


def test_pairs_in_a_bucket(fake_gcs, monkeypatch, tmp_path):
    """gs:// served by an in-memory fsspec file system: the layout is listed, the headers
    and pixels read through etils.epath, and nothing touches the local disk."""
    import io

    from etils import epath

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images = {}
    for sub, hw in (("HR", (20, 30)), ("X2.5", (8, 12))):
        images[sub] = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(images[sub]).save(png, format="PNG")
        stem = "a" if sub == "HR" else "ax2.5"
        (epath.Path("gs://bucket/pairs") / sub).mkdir(parents=True, exist_ok=True)
        (epath.Path("gs://bucket/pairs") / sub / f"{stem}.png").write_bytes(png.getvalue())
    (pair,) = find_pairs("gs://bucket/pairs")
    assert (pair.name, pair.scale) == ("a", 2.5)
    assert pair.lr_path == "gs://bucket/pairs/X2.5/ax2.5.png"
    lr, hr = pair_images(pair)
    np.testing.assert_array_equal(lr, images["X2.5"])
    np.testing.assert_array_equal(hr, images["HR"])
    assert not list(tmp_path.iterdir())
