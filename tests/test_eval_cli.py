"""srno-eval under bad input and faults, and on paired folders (small synthetic images)."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_GOLDEN
from PIL import Image

from srno_jax import eval_cli, evaluation
from srno_jax.images import resize_bicubic
from srno_jax.metrics import make_eval_pair, psnr

_ROOT = Path(__file__).resolve().parents[1]
_GOLDEN = SMALL_GOLDEN


def _image(path, hw, seed=0, smooth=False):
    """Saves a random uint8 RGB image of size hw = (H, W) (a smooth ramp with `smooth`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if smooth:
        y, x = np.mgrid[: hw[0], : hw[1]]
        img = np.stack([(x * 3 + y) % 256, (y * 5) % 256, np.full(hw, 128)], -1)
    else:
        img = rng.integers(0, 256, (*hw, 3))
    Image.fromarray(img.astype(np.uint8)).save(path)
    return np.asarray(Image.open(path))


def _run(*args, checkpoint="bicubic"):
    return eval_cli.main(
        ["--checkpoint", str(checkpoint), "--compilation_cache", "", *map(str, args)]
    )


def _strict_json(path):
    """The JSON document, refusing Infinity and NaN, which are not JSON."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture
def forward_passes(monkeypatch):
    """Counts the upsampler calls (forward passes) of evaluation."""
    calls = []
    score_pair = evaluation.score_pair

    def counted(upsampler, *args, **kwargs):
        calls.append(args[-3])
        return score_pair(upsampler, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score_pair", counted)
    return calls


def test_folders_with_the_same_name_are_both_evaluated(tmp_path, capsys):
    a, b = tmp_path / "a" / "imgs", tmp_path / "b" / "imgs"
    hr_a = _image(a / "x.png", (32, 32), smooth=True)
    hr_b = _image(b / "y.png", (32, 32), seed=1)
    out = tmp_path / "r.json"
    assert _run("--data", f"{a},{b}", "--scales", "2", "--json", out) == 0
    rows = _strict_json(out)["results"]
    assert [(r["dataset"], r["path"]) for r in rows] == [("a/imgs", str(a)), ("b/imgs", str(b))]
    for r, hr in zip(rows, (hr_a, hr_b)):
        expected = evaluation.score_image(evaluation.bicubic_upsampler, hr, 2, "benchmark")["psnr"]
        assert r["psnr"] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["psnr"] > rows[1]["psnr"] + 5
    assert capsys.readouterr().out.splitlines()[0] == "| method | a/imgs x2 | b/imgs x2 |"


def test_scales_equal_to_six_digits_get_distinct_headers(tmp_path, capsys):
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    assert _run("--data", tmp_path / "imgs", "--scales", "2,2.0000001,3") == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| method | imgs x2 | imgs x2.0000001 | imgs x3 |"
    assert evaluation.scale_labels([2.5, 1 / 3, 2.5]) == {2.5: "x2.5", 1 / 3: "x0.333333"}
    assert evaluation.scale_labels([0.1 + 0.2, 0.3]) == {
        0.1 + 0.2: "x0.30000000000000004",
        0.3: "x0.3",
    }


def test_unique_dataset_names():
    sep = os.sep
    assert evaluation.unique_datasets(
        [
            ("imgs", f"x{sep}a{sep}imgs"),
            ("imgs", f"y{sep}a{sep}imgs"),
            ("Set5", f"p{sep}Set5{sep}HR"),
            ("Set5", f"q{sep}Set5{sep}HR"),
            ("c", "c"),
            ("c", "c"),
        ]
    ) == [
        ("x/a/imgs", f"x{sep}a{sep}imgs"),
        ("y/a/imgs", f"y{sep}a{sep}imgs"),
        ("p/Set5", f"p{sep}Set5{sep}HR"),
        ("q/Set5", f"q{sep}Set5{sep}HR"),
        ("c", "c"),
    ]


def _broken_images(folder):
    """A truncated PNG and a text file named .png in `folder`."""
    _image(folder / "cut.png", (32, 32), seed=2)
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")


def test_bad_images_are_skipped_and_counted(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    _image(first / "ok.png", (32, 32))
    hr = _image(second / "ok.png", (32, 32), seed=1)
    _broken_images(second)
    out = tmp_path / "r.json"
    assert _run("--data", f"{first},{second}", "--scales", "2", "--json", out) == 0
    captured = capsys.readouterr()
    assert "skipping second/cut.png" in captured.err and "skipping second/text.png" in captured.err
    _, r = _strict_json(out)["results"]
    assert r["images"] == 1 and [s["image"] for s in r["skipped"]] == ["cut.png", "text.png"]
    assert (
        r["psnr"]
        == evaluation.score_image(evaluation.bicubic_upsampler, hr, 2, "benchmark")["psnr"]
    )
    assert f"| {r['psnr']:.2f}* |" in captured.out
    assert "second x2: 1 image scored, 2 skipped (cut.png, text.png)" in captured.out


def test_strict_stops_at_a_bad_image_before_any_work(tmp_path, capsys, forward_passes):
    first, second = tmp_path / "first", tmp_path / "second"
    _image(first / "ok.png", (32, 32))
    _broken_images(second)
    assert _run("--data", f"{first},{second}", "--scales", "2", "--strict") == 2
    err = capsys.readouterr().err
    assert "error: second: cut.png: cannot read image" in err and "Traceback" not in err
    assert forward_passes == []


def test_unsupported_mode_is_found_before_any_work(tmp_path, capsys, forward_passes):
    """A 32-bit float TIFF (which `images.load_image` refuses) is checked in the plan:
    --strict stops before the first forward pass; otherwise one warning for all scales."""
    folder = tmp_path / "imgs"
    _image(folder / "a.png", (32, 32))
    Image.fromarray(np.zeros((32, 32), np.float32)).save(folder / "f.tif")
    assert _run("--data", folder, "--scales", "2,3", "--strict") == 2
    err = capsys.readouterr().err
    assert "error: imgs: f.tif: " in err and "32-bit float" in err and "Traceback" not in err
    assert forward_passes == []
    assert _run("--data", folder, "--scales", "2,3") == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert "skipping imgs/f.tif at x2, x3: " in line and "32-bit float" in line
    assert forward_passes == [2.0, 3.0]  # a.png alone


def test_bad_image_found_while_running_is_skipped(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    _image(folder / "a.png", (32, 32))
    _image(folder / "b.png", (32, 32), seed=1)
    out = tmp_path / "r.json"
    # The file passes the check, then goes bad before it is read.
    monkeypatch.setattr(evaluation, "check_image", lambda path: (32, 32))
    (folder / "b.png").write_text("gone")
    assert _run("--data", folder, "--scales", "2", "--json", out) == 0
    (r,) = _strict_json(out)["results"]
    assert r["images"] == 1 and r["skipped"][0]["image"] == "b.png"
    assert "skipping imgs/b.png" in capsys.readouterr().err
    assert _run("--data", folder, "--scales", "2", "--strict") == 2


@pytest.mark.parametrize("where", ["missing/r.json", "."])  # no such folder; a folder
def test_unwritable_json_fails_before_any_work(tmp_path, capsys, forward_passes, where):
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    assert _run("--data", tmp_path / "imgs", "--scales", "2", "--json", tmp_path / where) == 2
    err = capsys.readouterr().err
    assert "cannot write --json" in err and "Traceback" not in err
    assert forward_passes == []


def test_full_disk_keeps_the_last_good_json(tmp_path, capsys, monkeypatch):
    """The disk fills up while the JSON is rewritten after the second cell: one error,
    no half-written file left beside it, and the file as the first cell left it."""
    import errno

    from etils import epath

    _image(tmp_path / "imgs" / "a.png", (32, 32))
    out = tmp_path / "r.json"
    path_type = type(epath.Path(out))
    write_text = path_type.write_text

    def full_disk(self, text, *args, **kwargs):
        if text.count('"dataset"') >= 2:
            write_text(self, text[: len(text) // 2])  # what fitted
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(path_type, "write_text", full_disk)
    assert _run("--data", tmp_path / "imgs", "--scales", "2,3,4", "--json", out) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line == (
        f"srno-eval: error: cannot write --json {out}: No space left on device; the file is "
        "left with the first 1 cell; free some space or choose another path"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "r.json"]
    doc = _strict_json(out)
    assert doc["complete"] is False and [r["scale"] for r in doc["results"]] == [2.0]
    assert (
        "| method | imgs x2 | imgs x3 |" in captured.out and "stopped after 2 cells" in captured.out
    )


def test_json_never_replaces_an_input(tmp_path, capsys, forward_passes):
    """--json naming the checkpoint or an HR image is refused; an earlier result is replaced."""
    hr = tmp_path / "imgs" / "a.png"
    _image(hr, (32, 32))
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes((_GOLDEN / "checkpoint.pth").read_bytes())
    before = {p: p.read_bytes() for p in (hr, ckpt)}
    for target in (ckpt, hr):
        args = ("--data", tmp_path / "imgs", "--scales", "2", "--json", target)
        assert _run(*args, checkpoint=ckpt) == 2
        err = capsys.readouterr().err
        assert "is not an srno-eval result" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before and forward_passes == []
    out = tmp_path / "r.json"
    assert _run("--data", tmp_path / "imgs", "--scales", "2", "--json", out) == 0
    assert _run("--data", tmp_path / "imgs", "--scales", "3", "--json", out) == 0  # a rerun
    assert _strict_json(out)["results"][0]["scale"] == 3


def test_failed_checks_keep_an_existing_json(tmp_path, capsys):
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    out = tmp_path / "r.json"
    out.write_text('{"earlier": "results"}')
    assert (
        _run(
            "--data",
            tmp_path / "imgs",
            "--scales",
            "2",
            "--json",
            out,
            checkpoint=tmp_path / "no_such.pth",
        )
        == 2
    )
    assert "no_such.pth" in capsys.readouterr().err
    assert out.read_text() == '{"earlier": "results"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "r.json"]


def _interrupt_at_scale(monkeypatch, scale, error):
    score_item = evaluation.score_item

    def failing(upsampler, item, s, *args):
        if s == scale:
            raise error
        return score_item(upsampler, item, s, *args)

    monkeypatch.setattr(evaluation, "score_item", failing)


def test_interrupted_run_keeps_what_finished(tmp_path, capsys, monkeypatch):
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    out = tmp_path / "r.json"
    _interrupt_at_scale(monkeypatch, 3.0, KeyboardInterrupt())
    assert _run("--data", tmp_path / "imgs", "--scales", "2,3,4", "--json", out) == 130
    doc = _strict_json(out)
    assert doc["complete"] is False and [r["scale"] for r in doc["results"]] == [2.0]
    captured = capsys.readouterr()
    assert captured.out.startswith("| method | imgs x2 |\n|---|---|\n| bicubic | ")
    assert "incomplete" in captured.out and "interrupted" in captured.err


def test_sigterm_keeps_what_finished(tmp_path, capsys, monkeypatch, sigterm_guard):
    """A scheduler's SIGTERM is handled as Ctrl-C is: the cells done are kept, exit 143."""
    import signal

    class Signalled(Exception):
        pass

    def send_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise Signalled  # reached only if the signal did not interrupt first

    _image(tmp_path / "imgs" / "a.png", (32, 32))
    out = tmp_path / "r.json"
    score_item = evaluation.score_item
    monkeypatch.setattr(
        evaluation,
        "score_item",
        lambda up, item, s, *a: send_sigterm() if s == 3.0 else score_item(up, item, s, *a),
    )
    assert _run("--data", tmp_path / "imgs", "--scales", "2,3,4", "--json", out) == 143
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # put back after the run
    doc = _strict_json(out)
    assert doc["complete"] is False and [r["scale"] for r in doc["results"]] == [2.0]
    assert "interrupted" in capsys.readouterr().err


def test_crash_keeps_what_finished(tmp_path, capsys, monkeypatch):
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    out = tmp_path / "r.json"
    _interrupt_at_scale(monkeypatch, 4.0, RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        _run("--data", tmp_path / "imgs", "--scales", "2,3,4", "--json", out)
    doc = _strict_json(out)
    assert doc["complete"] is False and [r["scale"] for r in doc["results"]] == [2.0, 3.0]
    assert "| method | imgs x2 | imgs x3 |" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["reader gone", "name not encodable"])
def test_output_cannot_fail_a_finished_run(tmp_path, fault):
    """The JSON is written before any output, and the output cannot fail the run: a
    closed stdout (``| true``) or one that cannot encode a folder's name (not UTF-8)."""
    folder = os.fsencode(tmp_path / "imgs") + b"\xff"
    _image(Path(os.fsdecode(folder)) / "a.png", (32, 32))
    out = tmp_path / "r.json"
    read, write = os.pipe()
    if fault == "reader gone":
        os.close(read)
    proc = subprocess.run(
        [sys.executable, _ROOT / "eval.py", "--checkpoint", "bicubic", "--data", folder]
        + ["--scales", "2,3", "--json", out, "--compilation_cache", ""],
        stdout=write,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        cwd=_ROOT,
        timeout=300,
    )
    os.close(write)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()
    doc = _strict_json(out)
    assert doc["complete"] is True and len(doc["results"]) == 2 and "timing" in doc
    if fault == "name not encodable":
        with os.fdopen(read, "rb") as f:
            assert f.readline() == b"| method | imgs? x2 | imgs? x3 |\n"


def test_a_table_that_cannot_be_written_is_an_error(tmp_path):
    """A full disk behind stdout (``> table.md``) is no closed pipe: exit 2, the JSON kept."""
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    out = tmp_path / "r.json"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, _ROOT / "eval.py", "--checkpoint", "bicubic"]
            + ["--data", tmp_path / "imgs", "--scales", "2", "--json", out]
            + ["--compilation_cache", ""],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=_ROOT,
            timeout=300,
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: cannot print the table: No space left on device" in proc.stderr
    assert _strict_json(out)["complete"] is True


def _bomb(path, side=60000):
    """A 1 x 1 grayscale PNG whose header claims side x side pixels."""
    png = bytearray()
    Image.new("L", (1, 1)).save(path)
    png[:] = path.read_bytes()
    png[16:24] = struct.pack(">II", side, side)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path.write_bytes(bytes(png))


def test_decompression_bomb_is_one_line(tmp_path, capsys):
    folder = tmp_path / "imgs"
    _image(folder / "a.png", (32, 32))
    _bomb(folder / "bomb.png")
    assert _run("--data", folder, "--scales", "2,3") == 0
    captured = capsys.readouterr()
    assert "skipping imgs/bomb.png at x2, x3: refusing" in captured.err  # one warning
    assert len(captured.err.splitlines()) == 1
    assert "imgs x3: 1 image scored, 1 skipped (bomb.png)" in captured.out
    assert _run("--data", folder, "--scales", "2", "--strict") == 2
    err = capsys.readouterr().err
    assert "error: imgs: bomb.png: refusing" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_output_size_limit(tmp_path, capsys, monkeypatch, forward_passes):
    _image(tmp_path / "imgs" / "a.png", (40, 40))
    assert _run("--data", tmp_path / "imgs", "--scales", "2", "--max_output_pixels", 1000) == 2
    err = capsys.readouterr().err
    assert "40x40 output (1600 pixels), more than the limit of 1000" in err
    assert "raise it with --max_output_pixels" in err
    from srno_jax import image_api

    monkeypatch.setattr(image_api, "MAX_OUTPUT_PIXELS", 1599)  # the default limit
    assert _run("--data", tmp_path / "imgs", "--scales", "2") == 2
    assert forward_passes == []
    assert _run("--data", tmp_path / "imgs", "--scales", "2", "--max_output_pixels", 1600) == 0


def test_infinite_psnr_is_null_in_json(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(folder / "flat.png")
    out = tmp_path / "r.json"
    assert _run("--data", folder, "--scales", "2", "--json", out, "--per_image") == 0
    (r,) = _strict_json(out)["results"]  # bicubic reproduces a flat image exactly
    assert r["psnr"] is None and r["images"] == 1 and r["per_image"][0]["psnr"] is None
    assert "| bicubic | inf |" in capsys.readouterr().out


def test_exif_orientation_is_ignored(tmp_path):
    """Evaluation scores the pixels as stored, as the reference and training read them."""
    img = Image.fromarray(np.zeros((41, 60, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "o.png", exif=exif)
    (task,) = evaluation.plan([("o", str(tmp_path))], [2.0])
    sizes = []
    evaluation.evaluate_task(lambda lr, size, s: sizes.append(size) or np.zeros((*size, 3)), task)
    assert sizes == [(40, 60)]  # the stored 41 x 60 cropped to x2, not the displayed 60 x 41


def test_protocol_follows_the_folders_own_name_when_display_names_clash(tmp_path):
    """Two DIV2K_valid_HR folders are shown as a/DIV2K_valid_HR and b/DIV2K_valid_HR;
    both are still scored under the div2k protocol, which the name chose."""
    datasets = []
    for parent in ("a", "b"):
        _image(tmp_path / parent / "DIV2K_valid_HR" / "x.png", (32, 32))
        datasets.append(evaluation.resolve_dataset(str(tmp_path / parent / "DIV2K_valid_HR"), None))
    tasks = evaluation.plan(datasets, [2.0])
    assert [t.dataset for t in tasks] == ["a/DIV2K_valid_HR", "b/DIV2K_valid_HR"]
    assert [t.protocol for t in tasks] == ["div2k", "div2k"]


@pytest.mark.parametrize(
    "protocol,scale", [("y", 2.0), (None, 1.0), (None, float("inf")), (None, float("nan"))]
)
def test_plan_refuses_bad_protocol_and_scale(tmp_path, protocol, scale):
    from srno_jax.errors import ConfigError

    _image(tmp_path / "a.png", (32, 32))
    with pytest.raises(ConfigError):
        evaluation.plan([("x", str(tmp_path))], [scale], protocol)


@pytest.mark.parametrize("flag", ["--max_output_pixels", "--chunk_size"])
@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_limits_must_be_positive(tmp_path, capsys, flag, value):
    _image(tmp_path / "a.png", (32, 32))
    with pytest.raises(SystemExit) as e:
        _run("--data", tmp_path, "--scales", "2", f"{flag}={value}")
    assert e.value.code == 2 and "is not a whole number >= 1" in capsys.readouterr().err


def test_format_results_of_training():
    assert evaluation.format_results({3.0: (31.5, 30.65), 2.0: (34.434, 32.92)}) == (
        "| method | x2 | x3 |\n|---|---|---|\n| bicubic | 32.92 | 30.65 |\n| SRNO | 34.43 | 31.50 |"
    )


# Paired folders: the given LR images, at the pairs' own scales.


def _nearest(hr, hw):
    """An LR image that no bicubic downsample gives: nearest-neighbour."""
    return np.asarray(Image.fromarray(hr).resize(hw[::-1], Image.NEAREST))


def _pair(root, name, lr_dir, hr_hw, lr_hw, lr_name=None, seed=0):
    """Writes root/HR/<name>.png and its nearest-neighbour LR root/<lr_dir>/<lr_name>.png."""
    hr = _image(root / "HR" / f"{name}.png", hr_hw, seed=seed, smooth=True)
    lr = _nearest(hr, lr_hw)
    (root / lr_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(lr).save(root / lr_dir / f"{lr_name or name}.png")
    return lr, hr


def test_paired_folder_uses_the_given_lr_images(tmp_path, capsys):
    root = tmp_path / "pairs"
    lr_a, hr_a = _pair(root, "a", "LR", (50, 40), (20, 16))  # x2.5
    lr_b, hr_b = _pair(root, "b", "LR", (30, 34), (15, 17), seed=1)  # x2
    out = tmp_path / "r.json"
    assert _run("--data", root, "--scales", "3", "--json", out) == 0
    captured = capsys.readouterr()
    assert "--scales does not apply to the paired folder pairs" in captured.err
    assert captured.out.splitlines()[0] == "| method | pairs x2 | pairs x2.5 |"
    rows = _strict_json(out)["results"]
    assert [(r["scale"], r["images"]) for r in rows] == [(2.0, 1), (2.5, 1)]
    for r, lr, hr in zip(rows, (lr_b, lr_a), (hr_b, hr_a)):
        expected = psnr(resize_bicubic(lr, hr.shape[:2]) / 255, hr / 255, "benchmark", r["scale"])
        assert r["psnr"] == pytest.approx(expected, abs=1e-9)
        made = psnr(
            resize_bicubic(make_eval_pair(hr, r["scale"])[0], hr.shape[:2]) / 255,
            hr / 255,
            "benchmark",
            r["scale"],
        )
        assert abs(r["psnr"] - made) > 0.1  # not the LR that bicubic would have made


def test_a_pair_whose_lr_side_was_rounded_up_is_scored_on_its_lr_grid(tmp_path):
    """HR 39 x 59 with an LR of 20 x 30 at x2: the LR covers a 40 x 60 grid, one row and
    column more than the HR image. The prediction is of that grid, cropped to the HR
    image; predicting 39 x 59 would stretch it over the LR image, up to a pixel off."""
    root = tmp_path / "pairs"
    full = _image(tmp_path / "full.png", (40, 60), smooth=True)
    lr = resize_bicubic(full, (20, 30))
    hr = full[:39, :59]
    (root / "HR").mkdir(parents=True)
    (root / "X2").mkdir()
    Image.fromarray(np.ascontiguousarray(hr)).save(root / "HR" / "a.png")
    Image.fromarray(lr).save(root / "X2" / "ax2.png")
    out = tmp_path / "r.json"
    assert _run("--data", root, "--json", out) == 0
    (row,) = _strict_json(out)["results"]
    aligned = resize_bicubic(lr, (40, 60))[:39, :59] / 255
    assert row["psnr"] == pytest.approx(psnr(aligned, hr / 255, "benchmark", 2), abs=1e-9)
    stretched = resize_bicubic(lr, (39, 59)) / 255
    assert row["psnr"] > psnr(stretched, hr / 255, "benchmark", 2) + 1


def test_data_and_scales_may_be_repeated(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _image(a / "x.png", (24, 24), smooth=True)
    _image(b / "y.png", (24, 24), seed=1)
    assert _run("--data", a, "--data", b, "--scales", "2", "--scales", "3,4") == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "| method | a x2 | a x3 | a x4 | b x2 | b x3 | b x4 |"
    )


def test_paired_div2k_layout(tmp_path, capsys):
    root = tmp_path / "DIV2K_valid"
    _pair(root, "0801", "X2", (24, 30), (12, 15), lr_name="0801x2")
    _pair(root, "0801", "X3", (24, 30), (8, 10), lr_name="0801x3")
    out = tmp_path / "r.json"
    assert _run("--data", root, "--json", out) == 0
    rows = _strict_json(out)["results"]
    assert [(r["dataset"], r["scale"], r["protocol"], r["images"]) for r in rows] == [
        ("DIV2K_valid", 2.0, "div2k", 1),
        ("DIV2K_valid", 3.0, "div2k", 1),
    ]
    assert "--scales" not in capsys.readouterr().err


def test_paired_sizes_that_match_no_scale(tmp_path, capsys):
    root = tmp_path / "pairs"
    _pair(root, "a", "LR", (50, 40), (20, 17))  # x2.5 down, x2.35 across
    assert _run("--data", root) == 2
    err = capsys.readouterr().err
    assert "match no single scale" in err and "Traceback" not in err


def test_paired_unreadable_lr_is_one_line(tmp_path, capsys, forward_passes):
    """An unreadable pair stops the evaluation as an unreadable HR image in a paired
    folder does: without its sizes the pair has no scale, so no cell to be skipped from."""
    root = tmp_path / "pairs"
    _pair(root, "a", "LR", (32, 32), (16, 16))
    _pair(root, "b", "LR", (32, 32), (16, 16))
    (root / "LR" / "b.png").write_bytes(b"not an image")
    assert _run("--data", root) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"cannot read image {root / 'LR' / 'b.png'}: PIL does not recognise it" in line
    assert "<_io" not in line and forward_passes == []


def test_unusable_compilation_cache_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    _image(tmp_path / "imgs" / "a.png", (32, 32))
    (tmp_path / "cache").write_text("")
    assert _run("--data", tmp_path / "imgs", "--compilation_cache", tmp_path / "cache") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"srno-eval: error: --compilation_cache {tmp_path / 'cache'} is a file")
    assert line.endswith("--compilation_cache '' to turn the cache off")


def test_second_run_compiles_nothing(tmp_path):
    """With the persistent compilation cache, a rerun in a new process loads every
    compiled function instead of compiling it."""
    _image(tmp_path / "imgs" / "a.png", (24, 20), smooth=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    timings = []
    for run in range(2):
        out = tmp_path / f"r{run}.json"
        proc = subprocess.run(
            [
                sys.executable,
                str(_ROOT / "eval.py"),
                "--checkpoint",
                str(_GOLDEN / "checkpoint.pth"),
                "--data",
                str(tmp_path / "imgs"),
                "--scales",
                "2",
                "--json",
                str(out),
                "--compilation_cache",
                str(tmp_path / "xla"),
            ],
            capture_output=True,
            text=True,
            cwd=_ROOT,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        timings.append(_strict_json(out)["timing"])
        assert f"{timings[-1]['compilations']} compilations" in proc.stderr
    first, second = timings
    assert first["compilations"] >= 3 and first["cache_hits"] == 0
    assert second["cache_hits"] == second["compilations"] == first["compilations"]
    assert second["xla_compile_s"] < first["xla_compile_s"]
    for t in timings:
        assert t["compile_s"] == pytest.approx(t["trace_lower_s"] + t["xla_compile_s"], abs=2e-3)


def test_paired_decompression_bomb_is_one_line(tmp_path, capsys):
    root = tmp_path / "pairs"
    _pair(root, "a", "LR", (32, 32), (16, 16))
    _bomb(root / "HR" / "b.png")
    _bomb(root / "LR" / "b.png", 30000)
    assert _run("--data", root) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and "b.png" in err and "MAX_IMAGE_PIXELS" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_per_image_does_not_change_which_images_are_scored(tmp_path, capsys):
    """A 16 x 16 image at x4 keeps 8 x 8 pixels after the shave: a PSNR, but no 11 x 11
    SSIM window. Asking for SSIM must not drop it from the table's mean."""
    folder = tmp_path / "imgs"
    _image(folder / "big.png", (40, 40), seed=1, smooth=True)
    _image(folder / "small.png", (16, 16), seed=2, smooth=True)
    rows = {}
    for extra in ((), ("--per_image",)):
        out = tmp_path / f"r{len(extra)}.json"
        assert _run("--data", folder, "--scales", "4", "--json", out, *extra) == 0
        (rows[extra],) = _strict_json(out)["results"]
    plain, per = rows[()], rows[("--per_image",)]
    assert plain["images"] == per["images"] == 2 and per["skipped"] == []
    assert per["psnr"] == plain["psnr"]
    by_name = {r["image"]: r for r in per["per_image"]}
    assert by_name["small.png"]["ssim"] is None and 0 < by_name["big.png"]["ssim"] <= 1
    assert per["psnr"] == pytest.approx(np.mean([r["psnr"] for r in per["per_image"]]))
    assert "skipping" not in capsys.readouterr().err
