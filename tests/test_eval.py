"""Tests of eval.py and srno_jax.evaluation on the golden photograph."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_ROOT = Path(__file__).resolve().parents[1]
_GOLDEN = next((d / "small_edsr_srno" for d in (_ROOT.parent / "shared" / "golden", _ROOT / "tests" / "golden")
                if (d / "small_edsr_srno" / "cases.npz").exists()), None)

sys.path.insert(0, str(_ROOT))
import eval as eval_script  # noqa: E402  (the repo-root script)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """<tmp>/benchmark/Set5/HR and <tmp>/DIV2K_valid_HR, each holding the golden HR photo;
    returns (folder, {(dataset, scale): reference PSNR})."""
    if _GOLDEN is None:
        pytest.skip("golden cases.npz not found")
    root = tmp_path_factory.mktemp("data")
    refs = {}
    with np.load(_GOLDEN / "cases.npz") as z:
        for case, folder, name, scale in (("benchmark_x4", "benchmark/Set5/HR", "Set5", 4.0),
                                          ("div2k_x2", "DIV2K_valid_HR", "DIV2K", 2.0)):
            (root / folder).mkdir(parents=True)
            hr = (z[f"psnr/{case}/hr"].transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(hr).save(root / folder / "photo.png")
            refs[name, scale] = float(z[f"psnr/{case}/psnr"])
    return root, refs


def test_bicubic_matches_reference_psnr(data_dir, tmp_path):
    root, refs = data_dir
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(_ROOT / "eval.py"), "--checkpoint", "bicubic",
                           "--data", "Set5,div2k", "--data_dir", str(root), "--scales", "2,4",
                           "--json", str(out)], capture_output=True, text=True, cwd=_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["dataset", "x2", "x4"]
    results = {(r["dataset"], r["scale"]): r for r in json.loads(out.read_text())["results"]}
    for (name, scale), ref in refs.items():
        r = results[name, scale]
        assert abs(r["psnr"] - ref) < 0.005
        assert r["protocol"] == ("div2k" if name == "DIV2K" else "benchmark") and r["images"] == 1
        assert f"{ref:.2f}" in proc.stdout


def test_model_checkpoint_gives_finite_psnr(data_dir, tmp_path, capsys):
    root, _ = data_dir
    small = tmp_path / "small" / "HR"  # a crop keeps the model run short
    small.mkdir(parents=True)
    hr = np.asarray(Image.open(root / "DIV2K_valid_HR" / "photo.png"))[:64, :72]
    Image.fromarray(hr).save(small / "crop.png")
    out = tmp_path / "r.json"
    rc = eval_script.main(["--checkpoint", str(_GOLDEN / "checkpoint.pth"), "--data", str(small),
                           "--scales", "2.5", "--json", str(out), "--per_image", "--no_progress",
                           "--chunk_size", "1000"])
    assert rc == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["dataset"] == "small" and r["scale"] == 2.5 and r["protocol"] == "benchmark"
    assert math.isfinite(r["psnr"]) and r["images"] == 1
    (img,) = r["per_image"]
    assert img["image"] == "crop.png" and img["psnr"] == r["psnr"] and -1 <= img["ssim"] <= 1
    assert "small" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "neither a folder"),
    (["--data", "Set14"], "not found"),
    (["--data", "Set5", "--scales", "0.5"], "scale"),
    (["--data", "Set5", "--protocol", "y"], "protocol"),
])
def test_bad_arguments_exit_2(data_dir, capsys, args, message):
    root, _ = data_dir
    assert eval_script.main(["--checkpoint", "bicubic", "--data_dir", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unparsable_scales_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        eval_script.main(["--checkpoint", "bicubic", "--data", "x", "--scales", "two"])
    assert e.value.code == 2 and "comma-separated" in capsys.readouterr().err
