"""examples/: the notebook runs top to bottom with the shipped trained model and beats
bicubic; the figure and curve scripts work (CPU, offline)."""

import re
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ASSET = EXAMPLES / "assets" / "demo_srno"
sys.path.insert(0, str(EXAMPLES))


def test_notebook_runs_and_the_shipped_model_beats_bicubic():
    import nbclient
    import nbformat

    nb = nbformat.read(EXAMPLES / "upscale.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    rows = re.findall(
        r"x([\d.]+): (\d+)x(\d+) -> (\d+)x(\d+)  PSNR bicubic ([\d.]+) dB, "
        r"SRNO ([\d.]+) dB",
        text,
    )
    assert [r[0] for r in rows] == ["2", "3.7", "4"]
    for scale, w, h, out_w, out_h, bicubic, srno in rows:
        assert (int(out_w), int(out_h)) == (
            round(int(w) * float(scale)),
            round(int(h) * float(scale)),
        )
        assert float(srno) > float(bicubic) + 0.3, (scale, bicubic, srno)
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 4  # three scales and the zoomed crop


def test_make_figure(tmp_path):
    import make_figure

    out = tmp_path / "fig.png"
    assert make_figure.main(["--workdir", str(ASSET), "--out", str(out), "--scales", "2"]) == 0
    with Image.open(out) as fig:
        assert fig.width > 3 * 2 * make_figure.CROPS["chelsea"][3]
        gray = np.asarray(fig.convert("L"), np.float64)
    assert gray.std() > 20 and len(np.unique(gray)) > 100  # photographs, not a blank canvas
    assert out.stat().st_size < 300_000


def test_plot_curves_reads_tensorboardx_event_files(tmp_path):
    import plot_curves
    import tensorboardX

    with tensorboardX.SummaryWriter(str(tmp_path / "first")) as w:
        for step, value in ((250, 30.5), (500, 31.25)):
            w.add_scalar("val/psnr_x2", value, step)
        w.add_scalar("train/loss", 0.5, 100)
    path = next((tmp_path / "first").glob("events.out.tfevents.*"))
    # A run killed mid-write: a record header promising 16 bytes, 3 of them written.
    path.write_bytes(path.read_bytes() + struct.pack("<Q", 16) + bytes(4) + b"abc")
    assert plot_curves.read_scalars(str(tmp_path / "first")) == {
        "val/psnr_x2": {250: 30.5, 500: 31.25},
        "train/loss": {100: 0.5},
    }
    # The demo's own validation logs "bicubic 32.92" at x2 (benchmark protocol).
    assert round(plot_curves.bicubic_psnr([2.0])[2.0], 2) == 32.92


def test_plot_curves_scores_bicubic_on_the_runs_own_validation(tmp_path, capsys, monkeypatch):
    """The dashed bicubic lines come from the run's data.val, eval.protocol and
    eval.max_images (its saved config), not from the demo's photographs."""
    import json

    import plot_curves
    import tensorboardX

    plotted = []  # matplotlib is the [examples] extra's, not the tests'
    monkeypatch.setattr(plot_curves, "plot", lambda *args: plotted.append(args))

    from srno_jax.evaluation import bicubic_upsampler, score_image

    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 44, 3), dtype=np.uint8) for _ in range(2)]
    for i, a in enumerate(images):
        Image.fromarray(a).save(val / f"{i}.png")
    wd = tmp_path / "run"
    (wd / "checkpoints" / "3" / "meta").mkdir(parents=True)
    config = {
        "data": {"val": str(val), "data_dir": ""},
        "eval": {"protocol": "div2k", "max_images": 1},
    }
    (wd / "checkpoints" / "3" / "meta" / "metadata").write_text(json.dumps({"config": config}))
    with tensorboardX.SummaryWriter(str(wd / "tensorboard")) as w:
        w.add_scalar("val/psnr_x2", 20.0, 3)
    assert plot_curves.main(["--workdir", str(wd), "--out", str(tmp_path / "c.png")]) == 0
    want = score_image(bicubic_upsampler, images[0], 2.0, "div2k")["psnr"]
    assert f"x2: step 3 20.00 dB, bicubic {want:.2f} dB" in capsys.readouterr().out
    assert plotted[0][1] == {2.0: want} and plotted[0][2] == str(tmp_path / "c.png")
    assert plot_curves.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "d.png")]) == 2
    assert "no srno-jax checkpoint" in capsys.readouterr().err


def test_a_resumed_runs_curve_drops_what_the_crashed_run_logged_after_its_start(tmp_path):
    """A run killed at step 6 after its checkpoint at 3 logged steps 4-6; resumed, it
    logs 4 and 5 again and stops: TensorBoard and plot_curves show 1-5 once each."""
    import time

    import plot_curves

    from srno_jax.metric_writer import MetricWriter

    first = MetricWriter(tmp_path)
    for step in range(1, 7):
        first.scalars(step, "val", psnr_x2=step)
    first.close()
    time.sleep(1.1)  # event files are named by the second they start in
    resumed = MetricWriter(tmp_path, start=3)
    for step in (4, 5):
        resumed.scalars(step, "val", psnr_x2=10 * step)
    resumed.close()
    curve = plot_curves.read_scalars(str(tmp_path / "tensorboard"))["val/psnr_x2"]
    assert curve == {1: 1, 2: 2, 3: 3, 4: 40, 5: 50}
    time.sleep(1.1)
    afresh = MetricWriter(tmp_path)  # crashed before its first checkpoint: from step 0
    afresh.scalars(2, "val", psnr_x2=7)
    afresh.close()
    assert plot_curves.read_scalars(str(tmp_path / "tensorboard"))["val/psnr_x2"] == {2: 7}
