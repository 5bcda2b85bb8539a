"""srno-upscale: output formats, folders and name patterns, the progress bar, and refusals
that come before any work (no checkpoint, clashing or unwritable outputs, bad images)."""

import io
import os
from importlib.metadata import version

import numpy as np
import pytest
from conftest import require_golden
from PIL import Image
from test_image_api import png_header

from srno_jax import upscale_cli
from srno_jax.image_api import upscale


@pytest.fixture(scope="module")
def ckpt():
    return str(require_golden("small_edsr_srno") / "checkpoint.pth")


@pytest.fixture(scope="module")
def small(ckpt):
    from srno_jax import load_checkpoint

    return load_checkpoint(ckpt)


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads: a refusal "before any work" leaves it at 0."""
    calls = []
    real = upscale_cli._model

    def counting(args):
        calls.append(args)
        return real(args)

    monkeypatch.setattr(upscale_cli, "_model", counting)
    return calls


def _rgb(seed, hw=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def run(*args):
    return upscale_cli.main([*map(str, args), "--compilation_cache="])


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(_rgb(3)).save(path)
    return path


@pytest.mark.parametrize(
    "ext,fmt",
    [
        (".png", "PNG"),
        (".jpg", "JPEG"),
        (".JPEG", "JPEG"),
        (".webp", "WEBP"),
        (".tif", "TIFF"),
        (".bmp", "BMP"),
    ],
)
def test_writes_the_format_the_name_asks_for(small, ckpt, photo, tmp_path, ext, fmt):
    out = tmp_path / f"out{ext}"
    assert run(photo, out, "--scale", 2.5, "--checkpoint", ckpt) == 0
    with Image.open(out) as img:
        assert img.format == fmt and img.size == (25, 30)
        if fmt in ("PNG", "TIFF", "BMP"):  # lossless
            np.testing.assert_array_equal(np.asarray(img), upscale(*small, _rgb(3), scale=2.5))


def test_quality_sets_jpeg_and_webp_compression(ckpt, photo, tmp_path, capsys):
    sizes = {}
    for ext in (".jpg", ".webp"):
        for q in (5, 100):
            out = tmp_path / f"q{q}{ext}"
            assert run(photo, out, "--scale", 4, "--checkpoint", ckpt, "--quality", q) == 0
            sizes[ext, q] = out.stat().st_size
        assert sizes[ext, 5] < sizes[ext, 100]
    assert run(photo, tmp_path / "x.png", "--scale", 2, "--checkpoint", ckpt, "--quality", 90) == 2
    assert run(photo, tmp_path / "x.jpg", "--scale", 2, "--checkpoint", ckpt, "--quality", 0) == 2
    err = capsys.readouterr().err
    assert "--quality applies to JPEG and WebP" in err and "--quality must be in 1..100" in err


def test_unknown_extension_is_refused_before_any_work(ckpt, photo, tmp_path, capsys, loads):
    assert run(photo, tmp_path / "out.xyz", "--scale", 2, "--checkpoint", ckpt) == 2
    err = capsys.readouterr().err
    assert "output format" in err and ".png" in err and len(err.splitlines()) == 1
    assert not loads and not (tmp_path / "out.xyz").exists()


def test_folder_and_several_inputs_with_a_name_pattern(small, ckpt, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(_rgb(0)).save(src / "a.png")
    Image.fromarray(_rgb(1)).save(src / "b.PNG")
    (src / "notes.txt").write_text("not an image")
    extra = tmp_path / "c.png"
    Image.fromarray(_rgb(7)).save(extra)
    results = tmp_path / "results"
    results.mkdir()
    # An output folder as last argument; then the same with --out_dir and a pattern.
    assert run(src, extra, results, "--scale", 2, "--checkpoint", ckpt) == 0
    assert sorted(os.listdir(results)) == ["a_x2.png", "b_x2.png", "c_x2.png"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(results / "c_x2.png")), upscale(*small, _rgb(7), scale=2)
    )
    assert (
        run(
            src,
            "--out_dir",
            results,
            "--name",
            "{stem}-{width}x{height}.{ext}",
            "--size",
            "20x24",
            "--checkpoint",
            ckpt,
        )
        == 0
    )
    assert {"a-20x24.png", "b-20x24.PNG"} <= set(os.listdir(results))
    assert Image.open(results / "b-20x24.PNG").size == (20, 24)


@pytest.mark.parametrize(
    "args,message",
    [
        (["{src}", "{tmp}/nowhere/", "--scale", "2"], "not an existing folder"),
        (["{src}", "--out_dir", "{tmp}/nowhere", "--scale", "2"], "not an existing folder"),
        (
            ["{src}/a.png", "{tmp}/a.png", "--out_dir", "{src}", "--scale", "2"],
            "would both be written",
        ),
        (
            ["{src}", "--out_dir", "{tmp}", "--name", "{{stem}}_{{colour}}.png", "--scale", "2"],
            "{colour} is not a field",
        ),
        (["{src}", "--out_dir", "{tmp}", "--name", "{{stem.png", "--scale", "2"], "not a valid"),
        (
            ["{src}", "--out_dir", "{tmp}", "--name", "x/{{stem}}.png", "--scale", "2"],
            "not a file name",
        ),
        (["{src}/a.png", "{tmp}/missing/out.png", "--scale", "2"], "does not exist"),
        (["{src}/a.png", "{tmp}/nowhere/", "--scale", "2"], "folder {tmp}/nowhere does not"),
        (["{src}/a.png", "{tmp}/" + "a" * 250 + ".png", "--scale", "2"], "a shorter name"),
        (["{src}/a.png", "{tmp}/out.webp", "--size", "16384x64"], "at most 16383 pixels"),
        (["{src}/a.png", "{tmp}/out.jpg", "--size", "65501x64"], "at most 65500 pixels"),
        (["{src}", "--out_dir", "{tmp}", "--name", "{{stem.foo}}.png", "--scale", "2"], "field"),
        (["{src}", "--out_dir", "{tmp}", "--name", "{{stem.upper}}.png", "--scale", "2"], "field"),
        (["{src}", "--out_dir", "{tmp}", "--name", "{{width:05d}}.png", "--scale", "2"], "field"),
        (["{src}/a.png", "{tmp}/out.png", "--scale=-1"], "scale must be a finite number > 1"),
        (["{src}/a.png", "{tmp}/out.png", "--scale", "1.0001"], "after rounding"),
        (["{src}/a.png", "{tmp}/out.png", "--size", "64x64"], "does not enlarge"),
        (["{src}/a.png", "{tmp}/out.png", "--size", "0x100"], "size 0x100 (width x height)"),
        (["{src}/a.png", "{tmp}/out.png", "--scale", "1e308"], "4.10e+619 pixels, more than"),
        (["{src}/a.png", "{tmp}/out.png", "--scale", "1e200"], "4.10e+403 pixels, more than"),
        (["{src}/a.png", "{tmp}/out.png", "--scale", "2", "--chunk_size", "0"], "--chunk_size"),
        (["{src}/a.png", "--scale", "2"], "give an output"),
        (["{tmp}/missing.png", "{tmp}/out.png", "--scale", "2"], "image not found"),
    ],
)
def test_refusals_come_before_any_work(ckpt, tmp_path, capsys, loads, args, message):
    src = tmp_path / "src"
    src.mkdir()
    for path in (src / "a.png", src / "b.jpg", tmp_path / "a.png"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    args = [a.format(src=src, tmp=tmp_path) for a in args]
    assert run(*args, "--checkpoint", ckpt) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and len(err.splitlines()) == 1
    assert "Traceback" not in err and not loads
    assert sorted(os.listdir(tmp_path)) == ["a.png", "src"] and len(os.listdir(src)) == 2


def test_a_batch_is_refused_before_any_work_when_one_output_cannot_be_written(
    ckpt, tmp_path, capsys, loads
):
    Image.fromarray(_rgb(0)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(1, (1, 8200))).save(tmp_path / "b.png")  # 2x: over WebP's 16383
    out = tmp_path / "out"
    out.mkdir()
    args = ("--out_dir", out, "--name", "{stem}.webp", "--scale", 2, "--checkpoint", ckpt)
    assert run(tmp_path / "a.png", tmp_path / "b.png", *args) == 2
    assert "b.webp would be 16400x2" in capsys.readouterr().err
    assert not loads and os.listdir(out) == []


@pytest.mark.parametrize(
    "names,name,fix",
    [
        (
            ("d1/a.png", "d2/a.png"),
            [],
            "upscale them in separate runs, each with its own --out_dir",
        ),
        (("d1/a.png", "d1/a.jpg"), [], "put {ext} in --name"),
        (("d1/a.png", "d1/b.png"), ["--name", "{width}.png"], "put {stem} in --name"),
    ],
)
def test_two_inputs_for_one_output_name_get_advice_that_works(
    ckpt, tmp_path, capsys, loads, names, name, fix
):
    for n in names:
        (tmp_path / n).parent.mkdir(exist_ok=True)
        Image.fromarray(_rgb(1)).save(tmp_path / n)
    inputs = [tmp_path / n for n in names]
    assert run(*inputs, "--out_dir", tmp_path, *name, "--scale", 2, "--checkpoint", ckpt) == 2
    err = capsys.readouterr().err
    assert "would both be written" in err and err.rstrip().endswith(fix)
    assert len(err.splitlines()) == 1 and not loads


def test_an_image_named_twice_is_upscaled_once(ckpt, tmp_path, capsys):
    """A folder and a file in it (a shell glob makes this easy), or one file twice."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir(), out.mkdir()
    for n in ("a.png", "b.png"):
        Image.fromarray(_rgb(1)).save(src / n)
    args = ("--scale", 2, "--checkpoint", ckpt)
    assert run(src / "b.png", src, f"{src}/", src / "b.png", out, *args) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    assert sorted(os.listdir(out)) == ["a_x2.png", "b_x2.png"]


def test_overwrite_never_replaces_another_input(ckpt, tmp_path, capsys, loads):
    for name in ("c.png", "c_x2.png"):
        Image.fromarray(_rgb(2)).save(tmp_path / name)
    before = (tmp_path / "c_x2.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        args = (tmp_path / "c.png", tmp_path / "c_x2.png", tmp_path, "--scale", 2)
        assert run(*args, "--checkpoint", ckpt, *extra) == 2
        err = capsys.readouterr().err
        assert f"the output for {tmp_path / 'c.png'}, {tmp_path / 'c_x2.png'}, is another" in err
        assert len(err.splitlines()) == 1 and not loads
        assert (tmp_path / "c_x2.png").read_bytes() == before


def test_an_existing_output_needs_overwrite(small, ckpt, tmp_path, capsys, loads):
    """`srno-upscale img1.png img2.png` meant as two inputs must not replace img2.png."""
    for name, seed in (("img1.png", 0), ("img2.png", 1)):
        Image.fromarray(_rgb(seed)).save(tmp_path / name)
    before = (tmp_path / "img2.png").read_bytes()
    assert (
        run(tmp_path / "img1.png", tmp_path / "img2.png", "--scale", 2, "--checkpoint", ckpt) == 2
    )
    err = capsys.readouterr().err
    assert f"output {tmp_path / 'img2.png'} already exists; pass --overwrite" in err
    assert "--out_dir" in err and len(err.splitlines()) == 1 and not loads
    assert (tmp_path / "img2.png").read_bytes() == before
    args = (tmp_path / "img1.png", tmp_path / "img2.png", "--scale", 2, "--checkpoint", ckpt)
    assert run(*args, "--overwrite") == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "img2.png")), upscale(*small, _rgb(0), scale=2)
    )


def test_a_batch_with_existing_outputs_is_refused_before_any_work(ckpt, tmp_path, capsys, loads):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(_rgb(1)).save(tmp_path / name)
    for name in ("b_x2.png", "c_x2.png"):
        (out / name).write_bytes(b"earlier result")
    inputs = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    assert run(*inputs, out, "--scale", 2, "--checkpoint", ckpt) == 2
    err = capsys.readouterr().err
    assert f"output {out / 'b_x2.png'} already exists (2 of the 3 outputs exist)" in err
    assert "replace them" in err and not loads
    assert sorted(os.listdir(out)) == ["b_x2.png", "c_x2.png"]
    assert (out / "c_x2.png").read_bytes() == b"earlier result"


@pytest.mark.parametrize("dtype,kind", [(np.float32, "float"), (np.int32, "integer")])
def test_32_bit_input_is_refused_before_any_work(ckpt, tmp_path, capsys, loads, dtype, kind):
    Image.fromarray(_rgb(4)[..., 0].astype(dtype)).save(tmp_path / "x.tif")
    assert run(tmp_path / "x.tif", tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt) == 2
    err = capsys.readouterr().err
    assert f"x.tif is a 32-bit {kind} image" in err and "8-bit or 16-bit" in err
    assert not loads and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("ext", [".webp", ".gif", ".tif", ".png"])
def test_animated_or_multi_page_input_is_refused_before_any_work(
    ckpt, tmp_path, capsys, loads, ext
):
    frames = [Image.fromarray(_rgb(seed)) for seed in range(3)]
    frames[0].save(tmp_path / f"anim{ext}", save_all=True, append_images=frames[1:])
    assert (
        run(tmp_path / f"anim{ext}", tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt) == 2
    )
    err = capsys.readouterr().err
    assert f"anim{ext} is animated or multi-page (3 frames)" in err and "save the frame" in err
    assert len(err.splitlines()) == 1 and not loads and not (tmp_path / "out.png").exists()


def test_an_mpo_camera_jpeg_reads_as_its_primary_image(small, ckpt, tmp_path):
    """Phone JPEGs often hold a second view or depth map (MPO): not an animation."""
    views = [Image.fromarray(_rgb(seed)) for seed in (3, 4)]
    views[0].save(tmp_path / "photo.jpg", format="MPO", save_all=True, append_images=views[1:])
    with Image.open(tmp_path / "photo.jpg") as img:
        assert img.format == "MPO" and img.n_frames == 2
        primary = np.asarray(img.convert("RGB"))
    assert (
        run(tmp_path / "photo.jpg", tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt) == 0
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out.png")), upscale(*small, primary, scale=2)
    )


def test_unwritable_output_folder_is_refused_before_any_work(
    ckpt, photo, tmp_path, capsys, loads, monkeypatch
):
    # chmod does not stop root, so the permission answer itself is replaced.
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if os.fspath(p) == str(tmp_path) else real(p, m)
    )
    assert run(photo, tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt) == 2
    assert "not writable" in capsys.readouterr().err and not loads


@pytest.mark.parametrize("hard_links", [True, False])
def test_an_output_made_while_computing_is_kept(
    ckpt, photo, tmp_path, capsys, monkeypatch, hard_links
):
    """A file that appears at the output's name after the check up front (another job,
    the user) is kept without --overwrite, on filesystems with and without hard links."""
    out = tmp_path / "out.png"
    from srno_jax import image_api  # main imports upscale from there when it runs

    compute = image_api.upscale

    def meanwhile(*args, **kwargs):
        out.write_bytes(b"someone else's")
        return compute(*args, **kwargs)

    monkeypatch.setattr(image_api, "upscale", meanwhile)
    if not hard_links:

        def no_links(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    assert run(photo, out, "--scale", 2, "--checkpoint", ckpt) == 2
    assert f"not replacing {out}: it exists" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["in.png", "out.png"]
    assert run(photo, out, "--scale", 2, "--checkpoint", ckpt, "--overwrite") == 0
    assert Image.open(out).size == (20, 24)


def test_output_equal_to_input_needs_overwrite(ckpt, photo, capsys, loads):
    before = photo.read_bytes()
    assert run(photo, photo, "--scale", 2, "--checkpoint", ckpt) == 2
    assert "--overwrite" in capsys.readouterr().err and not loads
    assert photo.read_bytes() == before
    assert run(photo, photo, "--scale", 2, "--checkpoint", ckpt, "--overwrite") == 0
    assert Image.open(photo).size == (20, 24)


def test_refuses_to_run_without_checkpoint(photo, tmp_path, capsys, loads):
    assert run(photo, tmp_path / "out.png", "--scale", 2) == 2
    err = capsys.readouterr().err
    assert "--checkpoint is required" in err and "--random_weights" in err and not loads
    assert run(photo, tmp_path / "out.png", "--scale", 2, "--checkpoint", tmp_path / "no.pth") == 2
    assert "checkpoint not found" in capsys.readouterr().err and not loads


def test_random_weights_run_loudly(photo, tmp_path, capsys, monkeypatch):
    import srno_jax.models as models

    real = models.make_model
    monkeypatch.setattr(
        models,
        "make_model",
        lambda: real(encoder_args={"n_resblocks": 1, "n_feats": 8}, width=16, heads=2),
    )
    assert run(photo, tmp_path / "out.png", "--scale", 2, "--random_weights") == 0
    assert "UNTRAINED" in capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (20, 24)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_only(ckpt, photo, tmp_path, capsys, monkeypatch):
    assert run(photo, tmp_path / "a.png", "--scale", 2, "--checkpoint", ckpt) == 0
    captured = capsys.readouterr()
    assert (
        "it/s" not in captured.err
        and "image/s" not in captured.err
        and "s/image" not in captured.err
    )
    assert "wrote" in captured.out and captured.err == ""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert run(photo, tmp_path / "b.png", "--scale", 2, "--checkpoint", ckpt) == 0
    assert "1/1" in terminal.getvalue() and "100%" in terminal.getvalue()


class _ClosedAfterOneLine(io.StringIO):
    """stdout piped into `head -1`: the first line goes through, then the pipe is closed."""

    def write(self, s):
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(s)


def test_a_closed_stdout_does_not_stop_the_batch(ckpt, tmp_path, capsys, monkeypatch):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(_rgb(1)).save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    stdout = _ClosedAfterOneLine()
    monkeypatch.setattr("sys.stdout", stdout)
    inputs = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    assert run(*inputs, out, "--scale", 2, "--checkpoint", ckpt) == 0
    assert sorted(os.listdir(out)) == ["a_x2.png", "b_x2.png", "c_x2.png"]
    assert stdout.getvalue() == f"wrote {out / 'a_x2.png'} (20x24)\n"
    assert capsys.readouterr().err == ""


class _FullDisk(io.StringIO):
    def write(self, s):
        raise OSError(28, "No space left on device")


def test_a_stdout_that_fails_does_not_stop_the_batch(ckpt, tmp_path, capsys, monkeypatch):
    """The lines are progress, the images the work: a full disk behind stdout is said once."""
    for name in ("a.png", "b.png"):
        Image.fromarray(_rgb(1)).save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr("sys.stdout", _FullDisk())
    assert run(tmp_path / "a.png", tmp_path / "b.png", out, "--scale", 2, "--checkpoint", ckpt) == 0
    assert sorted(os.listdir(out)) == ["a_x2.png", "b_x2.png"]
    err = capsys.readouterr().err
    assert err.count("cannot print to stdout: No space left on device") == 1, err


def test_a_name_stdout_cannot_encode_does_not_stop_the_work(ckpt, tmp_path, monkeypatch):
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 on disk: a surrogate in Python
    Image.fromarray(_rgb(1)).save(tmp_path / name)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdout", stdout)
    assert run(tmp_path / name, tmp_path, "--scale", 2, "--checkpoint", ckpt) == 0
    assert os.path.exists(tmp_path / os.fsdecode(b"caf\xe9_x2.png"))
    stdout.flush()
    assert b"caf?_x2.png (20x24)" in stdout.buffer.getvalue()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        upscale_cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"srno-upscale {version('srno-jax')}"


def test_exif_orientation_is_applied(small, ckpt, tmp_path):
    rgb = _rgb(5, (10, 14))  # stored landscape, shown portrait (orientation 6: 90 degrees CW)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "phone.png", exif=exif)
    assert (
        run(tmp_path / "phone.png", tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt) == 0
    )
    upright = np.rot90(rgb, k=-1)
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out.png")), upscale(*small, upright, scale=2)
    )


def test_an_icc_profile_is_kept_where_the_colours_fit_it(ckpt, tmp_path):
    """A Display-P3 or AdobeRGB photo keeps its profile, else its colours look wrong; a
    CMYK input's profile never tags its RGB output."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    profiles = {"RGB": srgb, "L": srgb[:16] + b"GRAY" + srgb[20:]}
    profiles["CMYK"] = srgb[:16] + b"CMYK" + srgb[20:]
    for mode, profile in profiles.items():
        Image.fromarray(_rgb(6)).convert(mode).save(tmp_path / f"{mode}.tif", icc_profile=profile)
        for ext in (".png", ".jpg"):
            out = tmp_path / f"{mode}{ext}"
            assert run(tmp_path / f"{mode}.tif", out, "--scale", 2, "--checkpoint", ckpt) == 0
            with Image.open(out) as img:
                assert img.mode == ("L" if mode == "L" else "RGB")
                assert img.info.get("icc_profile") == (None if mode == "CMYK" else profile)


def test_decompression_bomb_is_one_line(ckpt, tmp_path, capsys, loads):
    (tmp_path / "bomb.png").write_bytes(png_header(60000, 60000))
    assert run(tmp_path / "bomb.png", tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt) == 2
    err = capsys.readouterr().err
    assert "claims 3,600,000,000 pixels, more than PIL's limit of 89,478,485" in err
    assert err.rstrip().endswith("If you trust the file, raise the limit with --max_input_pixels.")
    assert "MAX_IMAGE_PIXELS" not in err and len(err.splitlines()) == 1 and not loads


def test_max_input_pixels_sets_the_limit_for_the_run_only(ckpt, photo, tmp_path, capsys, loads):
    default = Image.MAX_IMAGE_PIXELS
    args = (photo, tmp_path / "out.png", "--scale", 2, "--checkpoint", ckpt)
    assert run(*args, "--max_input_pixels", 119) == 2  # the photo has 12 x 10 = 120
    assert "claims 120 pixels, more than PIL's limit of 119" in capsys.readouterr().err
    assert not loads
    assert Image.MAX_IMAGE_PIXELS == default
    for bad in ("0", "-5", "1e3"):
        with pytest.raises(SystemExit) as e:
            run(*args, "--max_input_pixels", bad)
        assert e.value.code == 2 and "--max_input_pixels" in capsys.readouterr().err


def test_interrupt_keeps_finished_images(ckpt, tmp_path, capsys, monkeypatch):
    for name in ("a.png", "b.png"):
        Image.fromarray(_rgb(1)).save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    import srno_jax.image_api as image_api

    real, calls = image_api.upscale, []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(image_api, "upscale", second_interrupted)
    assert (
        run(tmp_path / "a.png", tmp_path / "b.png", out, "--scale", 2, "--checkpoint", ckpt) == 130
    )
    assert "interrupted; 1 image(s) written" in capsys.readouterr().err
    assert os.listdir(out) == ["a_x2.png"]


def test_sigterm_mid_write_leaves_no_partial_file(
    ckpt, tmp_path, capsys, monkeypatch, sigterm_guard
):
    """A scheduler's SIGTERM while the second output is being written: like Ctrl-C, the
    first output stays, the unfinished file is removed, exit status 143."""
    import signal

    for name in ("a.png", "b.png"):
        Image.fromarray(_rgb(1)).save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    real, saves = Image.Image.save, []

    def terminated_in_second_save(self, fp, *args, **kwargs):
        saves.append(fp)
        real(self, fp, *args, **kwargs)  # the bytes are on disk, not yet renamed
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Image.Image, "save", terminated_in_second_save)
    args = (tmp_path / "a.png", tmp_path / "b.png", out, "--scale", 2, "--checkpoint", ckpt)
    assert run(*args) == 143
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # put back after the run
    assert "interrupted; 1 image(s) written" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["a_x2.png"]  # no b_x2.png, no .b_x2.png.partial


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_that_python_drops_still_stops_the_run(
    ckpt, tmp_path, capsys, monkeypatch, sigterm_guard
):
    """A SIGTERM landing in a garbage-collection callback (JAX has one) raises there,
    where Python prints the exception as ignored and drops it; the run must still stop
    before its next image, not run on to exit 0."""
    import signal

    for name in ("a.png", "b.png"):
        Image.fromarray(_rgb(1)).save(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    real = Image.Image.save

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def save_after_a_dropped_stop(self, fp, *args, **kwargs):
        SignalledWhileCollected()  # its __del__ runs the handler; the exception is dropped
        real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_after_a_dropped_stop)
    args = (tmp_path / "a.png", tmp_path / "b.png", out, "--scale", 2, "--checkpoint", ckpt)
    assert run(*args) == 143
    assert "interrupted; 1 image(s) written" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["a_x2.png"]


def test_the_packages_warnings_read_as_the_tools_own_lines(ckpt, tmp_path, capsys):
    """Once each, as the tool's: not also as 'WARNING:srno_jax:...' through the root
    handler that Orbax's import leaves (and absl sets up again when there is none). A
    notebook that runs a tool's main() keeps its own handlers, open."""
    import logging

    from absl import logging as absl_logging

    from srno_jax import cli

    mine = logging.FileHandler(tmp_path / "notebook.log")
    before = logging.root.handlers[:]
    logging.root.handlers[:] = [mine]
    try:
        with cli.logged_as("srno-upscale"), cli.logged_as("srno-eval"):
            absl_logging.warning("from Orbax")
            logging.getLogger("srno_jax.data").warning("checkpoint %s is unreadable", 4)
            logging.getLogger("srno_jax").info("not shown")
        assert capsys.readouterr().err == (
            "srno-eval: warning: from Orbax\nsrno-eval: warning: checkpoint 4 is unreadable\n"
        )
        Image.fromarray(_rgb(1)).save(tmp_path / "a.png")
        assert run(tmp_path / "a.png", tmp_path / "b.png", "--scale", 2, "--checkpoint", ckpt) == 0
        assert logging.root.handlers == [mine]
        logging.getLogger("notebook").warning("after the tool")
        mine.flush()
        assert "after the tool" in (tmp_path / "notebook.log").read_text()
    finally:
        logging.root.handlers[:] = before
        mine.close()
