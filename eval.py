"""Evaluates SRNO (or the PIL-bicubic baseline) under the reference's PSNR protocol.

  python eval.py --checkpoint edsr-baseline_epoch-1000.pth --data Set5,Set14,div2k \\
      --data_dir load --scales 2,3,4,6,12 --json results.json

--checkpoint: a reference .pth, an Orbax training workdir or step folder, or 'bicubic'.
--data: comma-separated dataset names (Set5, Set14, B100, Urban100, div2k) resolved
under --data_dir, or folders of HR images. Prints a table (rows datasets, columns
scales, mean PSNR in dB). Errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from srno_jax.errors import ConfigError, SRNOError


def _scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .pth, an Orbax checkpoint folder, or 'bicubic'")
    p.add_argument("--data", required=True, help="comma-separated dataset names or HR folders")
    p.add_argument("--data_dir", default=None, help="folder holding benchmark/ and DIV2K_valid_HR/")
    p.add_argument("--scales", type=_scales, default=[2.0, 3.0, 4.0], help="e.g. 2,3,4,6,12 (>= 1)")
    p.add_argument("--protocol", default=None, help="'div2k' or 'benchmark' (default: by dataset)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--per_image", action="store_true", help="add per-image PSNR and SSIM to the JSON")
    p.add_argument("--chunk_size", type=int, default=None, help="query points per chunk")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from srno_jax import evaluation

        if args.protocol not in (None, "div2k", "benchmark"):
            raise ConfigError(f"unknown --protocol {args.protocol!r}; use 'div2k' or 'benchmark'")
        if not args.scales:
            raise ConfigError("--scales is empty")
        datasets = [evaluation.resolve_dataset(n.strip(), args.data_dir)
                    for n in args.data.split(",") if n.strip()]
        if args.checkpoint == "bicubic":
            upsampler = evaluation.bicubic_upsampler
        else:
            from srno_jax.checkpoints import load_checkpoint

            upsampler = evaluation.model_upsampler(*load_checkpoint(args.checkpoint), args.chunk_size)
        results = evaluation.evaluate(upsampler, datasets, args.scales, args.protocol,
                                      args.per_image, not args.no_progress)
    except SRNOError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    print(evaluation.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
