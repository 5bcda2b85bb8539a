"""The README's comparison figure: bicubic | SRNO | ground truth on a held-out photograph.

    python examples/make_figure.py --workdir runs/demo --out docs/comparison.png

For each scale the whole photograph is downsampled as the evaluation protocol does
(`metrics.make_eval_pair`: PIL bicubic), enlarged back with PIL bicubic and with SRNO
(`srno_jax.upscale`), and the same crop of the three is shown, magnified with nearest
neighbours so that pixels stay visible. The PSNR under each panel is that of the whole
photograph (benchmark protocol: Y, border shaved) from the 8-bit images shown.
`--workdir` takes anything `srno_jax.load_checkpoint` reads: a training workdir, a step
or export folder, or a reference .pth. The photographs are scikit-image's, never trained
on by the demo (`input_pipeline.DEMO_FILES['holdout']`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

import srno_jax  # noqa: E402
from srno_jax.images import resize_bicubic  # noqa: E402
from srno_jax.metrics import make_eval_pair, psnr  # noqa: E402

# (top, left, height, width) of the crop in the photograph: an eye and the fur around it.
CROPS = {"chelsea": (58, 112, 112, 120), "coffee": (120, 180, 112, 120)}
COLUMNS = ("bicubic", "SRNO", "ground truth")


def compare(model, variables, hr: np.ndarray, scale: float) -> list[tuple[np.ndarray, float]]:
    """[(bicubic, psnr), (SRNO, psnr), (ground truth, inf)] uint8 images of the HR size."""
    lr, hr = make_eval_pair(hr, scale)
    bicubic = resize_bicubic(lr, hr.shape[:2])
    sr = srno_jax.upscale(model, variables, lr, size=hr.shape[:2])
    return [(im, psnr(im / 255.0, hr / 255.0, "benchmark", scale)) for im in (bicubic, sr, hr)]


def render(
    rows: list[tuple[str, list[tuple[np.ndarray, float]]]], crop, zoom: int, title: str
) -> Image.Image:
    """The labelled grid: one row per scale, the three COLUMNS, crops magnified by `zoom`."""
    top, left, h, w = crop
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    pad, head, label, foot = 6, 44, 50, 20
    cell_w, cell_h = w * zoom, h * zoom
    canvas = Image.new(
        "RGB", (label + 3 * (cell_w + pad), head + len(rows) * (cell_h + foot + pad)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill="black", font=small)
    for j, name in enumerate(COLUMNS):
        draw.text(
            (label + j * (cell_w + pad) + cell_w // 2, head - 4),
            name,
            fill="black",
            font=font,
            anchor="ms",
        )
    for i, (row_name, panels) in enumerate(rows):
        y = head + i * (cell_h + foot + pad)
        draw.text((label // 2, y + cell_h // 2), row_name, fill="black", font=font, anchor="mm")
        for j, (image, db) in enumerate(panels):
            x = label + j * (cell_w + pad)
            tile = Image.fromarray(image[top : top + h, left : left + w])
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (x, y))
            if np.isfinite(db):
                draw.text(
                    (x + cell_w // 2, y + cell_h + 3),
                    f"{db:.2f} dB",
                    fill="black",
                    font=small,
                    anchor="mt",
                )
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir or any checkpoint")
    p.add_argument("--out", required=True, help="the figure's file, e.g. comparison.png")
    p.add_argument("--image", default="chelsea", choices=sorted(CROPS))
    p.add_argument("--scales", default="2,3.7,4", help="comma-separated, one row each")
    p.add_argument("--zoom", type=int, default=2, help="nearest-neighbour magnification")
    args = p.parse_args(argv)
    from skimage import data

    try:
        model, variables = srno_jax.load_checkpoint(args.workdir)
    except srno_jax.SRNOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hr = getattr(data, args.image)()
    scales = [float(s) for s in args.scales.split(",")]
    rows = [(f"x{s:g}", compare(model, variables, hr, s)) for s in scales]
    title = (
        f"{args.workdir} on scikit-image's '{args.image}' (held out); crops magnified "
        f"{args.zoom}x; PSNR of the whole photograph"
    )
    render(rows, CROPS[args.image], args.zoom, title).save(args.out, optimize=True)
    for name, panels in rows:
        print(
            name,
            "  ".join(f"{c} {db:.2f} dB" for c, (_, db) in zip(COLUMNS, panels) if np.isfinite(db)),
        )
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
