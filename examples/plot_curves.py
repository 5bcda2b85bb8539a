"""The README's training curve: validation PSNR against step, with bicubic as a line.

    python examples/plot_curves.py --workdir runs/demo --out docs/training_curve.png

Reads the `val/psnr_x<s>` scalars that training writes to `<workdir>/tensorboard`, and
computes the bicubic PSNR of the same validation images under the same protocol
(`evaluation.bicubic_upsampler`), which training does not log: those of the run's saved
config (`data.val`, `data.data_dir`, `eval.max_images`, `eval.protocol`), unless
`--data` or `--protocol` say otherwise. Needs matplotlib (`pip install -e '.[examples]'`).

The event files are read with a reader of a few lines (`read_scalars`) on top of
tensorboardX's own protobuf classes, so that no TensorFlow or `tensorboard` package is
needed: tensorboardX, which wrote them, is already a training dependency.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

VAL_TAG = re.compile(r"val/psnr_x([0-9.]+)$")


def read_records(path: str):
    """The payloads of a TFRecord file (TensorBoard's event file framing).

    Each record is a little-endian uint64 length, its 4-byte CRC, the payload and the
    payload's 4-byte CRC; the CRCs are not checked, and a truncated last record (a run
    still writing) ends the file.
    """
    with open(path, "rb") as f:
        while len(head := f.read(12)) == 12:
            (n,) = struct.unpack("<Q", head[:8])
            payload = f.read(n)
            if len(payload) < n or len(f.read(4)) < 4:
                return
            yield payload


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files of `logdir`.

    Files are read in name order (tensorboardX names them by start time). A resumed run's
    file starts with a session start at its first step (tensorboardX's ``purge_step``),
    which drops what earlier files logged from that step on, as TensorBoard does.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for payload in read_records(path):
            event = event_pb2.Event.FromString(payload)
            if event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [k for k in values if k >= event.step]:
                        del values[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def bicubic_psnr(
    scales,
    data: str = "demo",
    protocol: str = "benchmark",
    data_dir: str | None = None,
    max_images: int | None = None,
) -> dict[float, float]:
    """{scale: mean PSNR of PIL bicubic} over the first `max_images` (None: all)
    validation images of `data`, as training validates."""
    import input_pipeline
    from srno_jax.evaluation import bicubic_upsampler, score_image

    source = input_pipeline.make_source(data, "validation", data_dir)
    images = [source[i] for i in range(min(len(source), max_images or len(source)))]
    return {
        s: float(
            np.mean([score_image(bicubic_upsampler, hr, s, protocol)["psnr"] for hr in images])
        )
        for s in scales
    }


def plot(
    curves: dict[float, dict[int, float]], bicubic: dict[float, float], out: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.8), dpi=100)
    for i, s in enumerate(sorted(curves)):
        colour = f"C{i}"
        steps = sorted(curves[s])
        ax.plot(
            steps, [curves[s][k] for k in steps], "o-", color=colour, ms=3, label=f"SRNO x{s:g}"
        )
        ax.axhline(bicubic[s], color=colour, ls="--", lw=1, label=f"bicubic x{s:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation PSNR (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="the figure's file, e.g. curve.png")
    p.add_argument("--data", help="validation data (default: the run's data.val)")
    p.add_argument("--protocol", help="PSNR protocol (default: the run's eval.protocol)")
    args = p.parse_args(argv)
    from srno_jax import SRNOError
    from srno_jax.checkpoints import saved_config

    try:
        config = saved_config(args.workdir)
    except SRNOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = args.data or config["data"]["val"]
    protocol = args.protocol or config["eval"]["protocol"]
    scalars = read_scalars(os.path.join(args.workdir, "tensorboard"))
    curves = {float(m.group(1)): v for tag, v in scalars.items() if (m := VAL_TAG.match(tag))}
    if not curves:
        print(
            f"no validation PSNR in {args.workdir}/tensorboard; did the run validate "
            "(eval.every_steps)?",
            file=sys.stderr,
        )
        return 2
    bicubic = bicubic_psnr(
        sorted(curves),
        data,
        protocol,
        config["data"].get("data_dir") or None,
        config["eval"]["max_images"],
    )
    plot(curves, bicubic, args.out, f"{args.workdir}: validation PSNR ({protocol} protocol)")
    for s in sorted(curves):
        last = max(curves[s])
        print(f"x{s:g}: step {last} {curves[s][last]:.2f} dB, bicubic {bicubic[s]:.2f} dB")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
