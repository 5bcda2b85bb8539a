"""Tests of eval.py (srno_jax.eval_cli) and srno_jax.evaluation on the golden photograph."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL_GOLDEN
from PIL import Image

_ROOT = Path(__file__).resolve().parents[1]
_GOLDEN = SMALL_GOLDEN

from srno_jax import eval_cli, load_checkpoint
from srno_jax.coords import make_coord
from srno_jax.errors import DataError
from srno_jax.metrics import eval_cell, make_eval_pair, psnr


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """<tmp>/benchmark/Set5/HR and <tmp>/DIV2K_valid_HR, each holding the golden HR photo;
    returns (folder, {(dataset, scale): reference PSNR})."""
    root = tmp_path_factory.mktemp("data")
    refs = {}
    with np.load(_GOLDEN / "cases.npz") as z:
        for case, folder, name, scale in (
            ("benchmark_x4", "benchmark/Set5/HR", "Set5", 4.0),
            ("div2k_x2", "DIV2K_valid_HR", "DIV2K", 2.0),
        ):
            (root / folder).mkdir(parents=True)
            hr = (z[f"psnr/{case}/hr"].transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(hr).save(root / folder / "photo.png")
            refs[name, scale] = float(z[f"psnr/{case}/psnr"])
    return root, refs


def test_bicubic_matches_reference_psnr(data_dir, tmp_path):
    root, refs = data_dir
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(_ROOT / "eval.py"),
            "--checkpoint",
            "bicubic",
            "--data",
            "Set5,div2k",
            "--data_dir",
            str(root),
            "--scales",
            "2,4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == [
        "| method | Set5 x2 | Set5 x4 | DIV2K x2 | DIV2K x4 |",
        "|---|---|---|---|---|",
    ]
    assert proc.stdout.splitlines()[2].startswith("| bicubic | ")
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["checkpoints"] == ["bicubic"]
    results = {(r["dataset"], r["scale"]): r for r in doc["results"]}
    for (name, scale), ref in refs.items():
        r = results[name, scale]
        assert abs(r["psnr"] - ref) < 0.005
        assert r["protocol"] == ("div2k" if name == "DIV2K" else "benchmark") and r["images"] == 1
        assert f"{ref:.2f}" in proc.stdout


def test_checkpoints_give_one_row_each(data_dir, tmp_path, capsys):
    root, _ = data_dir
    small = tmp_path / "small" / "HR"  # a crop keeps the model run short
    small.mkdir(parents=True)
    hr = np.asarray(Image.open(root / "DIV2K_valid_HR" / "photo.png"))[:64, :72]
    Image.fromarray(hr).save(small / "crop.png")
    out = tmp_path / "r.json"
    pth = str(_GOLDEN / "checkpoint.pth")
    jax.clear_caches()  # compilations are counted: none may come from earlier tests
    rc = eval_cli.main(
        [
            "--checkpoint",
            f"bicubic,{pth}",
            "--checkpoint",
            "bicubic",
            "--data",
            str(small),
            "--scales",
            "2.5",
            "--json",
            str(out),
            "--per_image",
            "--chunk_size",
            "1000",
            "--compilation_cache",
            "",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["checkpoints"] == ["bicubic", pth]
    bic, r = doc["results"]
    assert (bic["checkpoint"], r["checkpoint"]) == ("bicubic", pth)
    assert r["dataset"] == "small" and r["scale"] == 2.5 and r["protocol"] == "benchmark"
    assert math.isfinite(r["psnr"]) and r["images"] == 1 and r["psnr"] != bic["psnr"]
    # The same protocol by hand: the reference's test pair, one-pass model, clamp, PSNR.
    lr, hr_c = make_eval_pair(hr, 2.5)
    model, variables = load_checkpoint(pth)
    inp = jnp.asarray(lr[None] / 255.0 * 2 - 1, jnp.float32)
    coord = jnp.asarray(make_coord(hr_c.shape[:2])[None])
    cell = jnp.asarray(eval_cell(hr_c.shape[:2], 2.5)[None])
    sr = np.clip((np.asarray(model.apply(variables, inp, coord, cell))[0] + 1) / 2, 0, 1)
    assert r["psnr"] == pytest.approx(psnr(sr, hr_c / 255.0, "benchmark", 2.5), abs=1e-4)
    (img,) = r["per_image"]
    assert img["image"] == "crop.png" and img["psnr"] == r["psnr"] and -1 <= img["ssim"] <= 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "| method | small x2.5 |",
        "|---|---|",
        f"| bicubic | {bic['psnr']:.2f} |",
        f"| {pth} | {r['psnr']:.2f} |",
        "",
        "PSNR protocol: benchmark (Y channel, shave ceil(s)) for small",
    ]
    # The compile share: the model compiled here; bicubic compiles nothing.
    timing = doc["timing"]
    assert timing["compilations"] >= 3 and 0 < timing["compile_s"] < timing["wall_s"]
    assert "compiling" in captured.err and f"{timing['compilations']} compilations" in captured.err
    assert "img/s" not in captured.err and "%|" not in captured.err  # stderr is no terminal: no bar


def test_data_dir_in_the_layouts_of_liif_and_srno(tmp_path):
    """LIIF's load/ keeps DIV2K in div2k/DIV2K_valid_HR; SRNO's configs spell hr lower-case."""
    from srno_jax.evaluation import resolve_dataset

    (tmp_path / "div2k" / "DIV2K_valid_HR").mkdir(parents=True)
    (tmp_path / "benchmark" / "Urban100" / "hr").mkdir(parents=True)
    assert resolve_dataset("div2k", str(tmp_path)) == (
        "DIV2K",
        str(tmp_path / "div2k" / "DIV2K_valid_HR"),
    )
    assert resolve_dataset("urban100", str(tmp_path))[1].endswith("benchmark/Urban100/hr")
    with pytest.raises(DataError, match=r"no folder .*Set5/HR or .*Set5/hr"):
        resolve_dataset("Set5", str(tmp_path))


def test_a_folder_named_like_a_benchmark_does_not_shadow_data_dir(tmp_path, monkeypatch):
    """A stray ./Set5 (SR outputs, an unzipped copy) must not replace the benchmark that
    --data_dir names; ./Set5 still reaches it, and without --data_dir Set5 is the folder."""
    from srno_jax.evaluation import resolve_dataset

    (tmp_path / "Set5").mkdir()
    (tmp_path / "load" / "benchmark" / "Set5" / "HR").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset("Set5", "load") == (
        "Set5",
        os.path.join("load", "benchmark", "Set5", "HR"),
    )
    assert resolve_dataset("./Set5", "load") == ("Set5", "Set5")
    assert resolve_dataset("Set5", None) == ("Set5", "Set5")
    with pytest.raises(DataError, match=r"no folder .*Set14/hr; to evaluate ./Set14 instead, pass"):
        (tmp_path / "Set14").mkdir()
        resolve_dataset("Set14", "load")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/no/such/folder"], "neither a folder"),
        (["--data", "Set14"], "no folder"),
        (["--data", "Set5", "--scales", "0.5"], "scale"),
        (["--data", "Set5", "--scales", "1"], "> 1"),
        (["--data", ","], "--data names nothing"),
        (["--data", "Set5", "--protocol", "y"], "protocol"),
    ],
)
def test_bad_arguments_exit_2(data_dir, capsys, args, message):
    root, _ = data_dir
    assert (
        eval_cli.main(
            ["--checkpoint", "bicubic", "--data_dir", str(root), "--compilation_cache", "", *args]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_checkpoint_list_exit_2(data_dir, capsys):
    root, _ = data_dir
    assert (
        eval_cli.main(
            [
                "--checkpoint",
                ", ",
                "--data",
                "Set5",
                "--data_dir",
                str(root),
                "--compilation_cache",
                "",
            ]
        )
        == 2
    )
    assert "--checkpoint names nothing" in capsys.readouterr().err


def test_unparsable_scales_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--checkpoint", "bicubic", "--data", "x", "--scales", "two"])
    assert e.value.code == 2 and "comma-separated" in capsys.readouterr().err


def test_a_model_that_predicts_nan_stops_the_evaluation(tmp_path):
    """NaN in one image's prediction is a broken model, not an image to skip while the
    others are averaged into a number that looks fine."""
    from srno_jax.errors import CheckpointError
    from srno_jax.evaluation import bicubic_upsampler, evaluate_task, plan

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / name)
    (task,) = plan([("imgs", str(folder))], [2.0])
    calls = []

    def nan_on_second(lr, hr_size, scale):
        calls.append(1)
        out = bicubic_upsampler(lr, hr_size, scale)
        return out * np.nan if len(calls) == 2 else out

    with pytest.raises(CheckpointError, match=r"NaN or infinite values at x2 \(24x24 output\)"):
        evaluate_task(nan_on_second, task)
    assert evaluate_task(bicubic_upsampler, task)["images"] == 2


def test_the_table_names_the_protocol_of_each_dataset():
    """The protocol follows the folder's name (/data/DIV2K/valid is a benchmark by that
    rule): the table says which one each column used."""
    from srno_jax.evaluation import format_table

    results = [
        {"checkpoint": "m", "dataset": d, "scale": 2.0, "psnr": 30.0, "protocol": p}
        for d, p in (("Set5", "benchmark"), ("DIV2K", "div2k"), ("valid", "benchmark"))
    ]
    assert format_table(results).splitlines()[-2:] == [
        "",
        "PSNR protocol: benchmark (Y channel, shave ceil(s)) for Set5, valid; "
        "div2k (RGB, shave ceil(s) + 6) for DIV2K",
    ]
    assert "protocol" not in format_table([{"scale": 2.0, "psnr": 30.0}])
