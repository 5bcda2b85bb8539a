"""``srno-upscale IN OUT (--scale S | --size WIDTHxHEIGHT) [--checkpoint PATH] [--chunk_size N]``.

Resizes one image with SRNO (`srno_jax.image_api.upscale`) and writes an 8-bit PNG
(grayscale stays grayscale, alpha is kept; 16-bit input is written as 8-bit).
Errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import re
import sys


from srno_jax.errors import ConfigError, SRNOError


def _size(text: str) -> tuple[int, int]:
    """'1920x1080' (width x height, as image editors write it) -> (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1920x1080")
    return int(m.group(2)), int(m.group(1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srno-upscale", description=__doc__.split("\n\n")[1])
    p.add_argument("input", help="image file (any format PIL reads)")
    p.add_argument("output", help="PNG file to write")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="scale factor, any number > 1 (e.g. 3.7)")
    how.add_argument("--size", type=_size, help="output size as WIDTHxHEIGHT, e.g. 1920x1080")
    p.add_argument("--checkpoint", help="reference .pth or Orbax checkpoint (default: an "
                   "untrained EDSR-baseline SRNO, for trying the tool only)")
    p.add_argument("--chunk_size", type=int, default=None,
                   help="query points per chunk; lower it to use less memory")
    return p


def _model(checkpoint: str | None):
    from srno_jax.checkpoints import load_checkpoint
    from srno_jax.models import init_variables, make_model

    if checkpoint:
        return load_checkpoint(checkpoint)
    print("warning: no --checkpoint given; using a randomly initialised EDSR-baseline SRNO. "
          "Its weights are UNTRAINED, so the output is not a real super-resolution.",
          file=sys.stderr)
    model = make_model()
    return model, init_variables(model)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from srno_jax.images import open_image, save_png
        from srno_jax.image_api import output_size, upscale

        if args.chunk_size is not None and args.chunk_size < 1:
            raise ConfigError(f"--chunk_size must be >= 1, got {args.chunk_size}")
        image = open_image(args.input)
        output_size((image.height, image.width), args.scale, args.size)  # fail before loading
        model, variables = _model(args.checkpoint)
        out = upscale(model, variables, image, scale=args.scale, size=args.size,
                      chunk_size=args.chunk_size)
        save_png(args.output, out)
    except SRNOError as e:
        print(f"srno-upscale: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({out.shape[1]}x{out.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
