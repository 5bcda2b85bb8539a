"""How the code is laid out: dependencies point one way, and workdir I/O goes through epath."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import srno_jax

ROOT = Path(__file__).resolve().parents[1]
# The command-line modules wire the packages together, as main.py does.
WIRING = {"srno_jax.train_cli"}


def test_srno_jax_never_imports_input_pipeline():
    modules = sorted(
        m.name
        for m in pkgutil.walk_packages(srno_jax.__path__, "srno_jax.")
        if m.name not in WIRING
    )
    assert "srno_jax.train" in modules and "srno_jax.checkpoints" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('input_pipeline', 'configs')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip() == "[]", out


def test_workdir_io_goes_through_epath():
    """The modules that touch a workdir or checkpoint never use os.path or open() on it, so
    a gs:// workdir is not turned into a local path."""
    for name in ("train", "checkpoints", "workdir", "metric_writer", "train_cli", "torch_pickle"):
        text = (ROOT / "srno_jax" / f"{name}.py").read_text()
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        assert not re.search(
            r"os\.path\.(abspath|join|isdir|exists|basename|dirname)|os\.listdir"
            r"|(?<![\w.])(?<!def )open\(",
            code.replace("os.path.join(list(spec", ""),
        ), name


def test_a_bucket_workdir_is_written_through_epath(fake_gcs, monkeypatch):
    """gs:// served by an in-memory fsspec file system: the workdir checks, the lock and
    the TensorBoard files all land in the bucket, none on the local disk, and image
    folders are listed and read from it."""
    from srno_jax import metric_writer, workdir
    from srno_jax.errors import ConfigError

    monkeypatch.chdir(Path(__file__).parent)
    run = workdir.check_writable("gs://bucket/run")
    assert str(run) == "gs://bucket/run" and not Path("gs:").exists()
    with workdir.WorkdirLock("gs://bucket/run"):
        assert '"pid"' in (run / "LOCK").read_text()
        try:
            workdir.WorkdirLock("gs://bucket/run").acquire()
            raise AssertionError("a second lock was granted")
        except ConfigError as e:
            assert "is in use by process" in str(e)
    assert not (run / "LOCK").exists()
    writer = metric_writer.MetricWriter("gs://bucket/run")
    writer.scalars(1, "train", loss=0.5)
    writer.close()
    events = list((run / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
    assert len(events[0].read_bytes()) > 0

    import io

    import numpy as np
    from PIL import Image

    from srno_jax.images import image_files, load_image

    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    (run / "imgs").mkdir()
    (run / "imgs" / "a.png").write_bytes(png.getvalue())
    (run / "imgs" / "notes.txt").write_text("")
    assert image_files("gs://bucket/run/imgs") == ["gs://bucket/run/imgs/a.png"]
    np.testing.assert_array_equal(load_image("gs://bucket/run/imgs/a.png"), pixels)

    # A bucket folder as training data and as an evaluation dataset, by path or by name.
    import input_pipeline
    from srno_jax import evaluation

    source = input_pipeline.make_source("gs://bucket/run/imgs")
    assert len(source) == 1
    np.testing.assert_array_equal(source[0], pixels)
    assert evaluation.resolve_dataset("gs://bucket/run/imgs/", None) == (
        "imgs",
        "gs://bucket/run/imgs",
    )
    (run / "benchmark" / "Set5" / "HR").mkdir(parents=True)
    assert evaluation.resolve_dataset("set5", "gs://bucket/run") == (
        "Set5",
        "gs://bucket/run/benchmark/Set5/HR",
    )


def test_a_reference_checkpoint_in_a_bucket_loads_for_upscaling(fake_gcs, tmp_path, capsys):
    """A .pth in a bucket reads as the local file does; srno-upscale takes it, and refuses a
    bucket's image in one line (its inputs and outputs are local files)."""
    import jax
    import numpy as np
    from conftest import SMALL_GOLDEN
    from etils import epath
    from PIL import Image

    from srno_jax import load_checkpoint, upscale_cli

    local = SMALL_GOLDEN / "checkpoint.pth"
    remote = epath.Path("gs://bucket/ck/checkpoint.pth")
    remote.parent.mkdir(parents=True)
    remote.write_bytes(local.read_bytes())
    (_, a), (_, b) = load_checkpoint(local), load_checkpoint(str(remote))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert (
        upscale_cli.main(
            [str(tmp_path / "in.png"), str(out), "--scale", "2", "--checkpoint", str(remote)]
        )
        == 0
    )
    assert Image.open(out).size == (10, 12)
    (epath.Path("gs://bucket/in.png")).write_bytes((tmp_path / "in.png").read_bytes())
    args = [
        "gs://bucket/in.png",
        str(tmp_path / "o2.png"),
        "--scale",
        "2",
        "--checkpoint",
        str(local),
    ]
    assert upscale_cli.main(args) == 2
    assert "local files only" in capsys.readouterr().err
