"""``srno-upscale INPUT... [OUTPUT] (--scale S | --size WIDTHxHEIGHT) --checkpoint PATH``.

Resizes images with SRNO (`srno_jax.image_api.upscale`) and writes each in the format its
name asks for (.png, .jpg/.jpeg, .webp, .tif/.tiff, .bmp).

  srno-upscale photo.jpg photo_x3.7.png --scale 3.7 --checkpoint CKPT      one image
  srno-upscale a.jpg b.jpg photos/ results/ --scale 2 --checkpoint CKPT     into a folder
  srno-upscale photos/ --out_dir results --name "{stem}.jpg" --scale 4 --checkpoint CKPT

Every input, output name and output folder is checked before the model is loaded. An
existing output file is refused unless --overwrite is given (so `srno-upscale a.png
b.png --scale 2`, meant as two inputs, cannot replace b.png); an output that is another
input is refused even then. Images are read upright (their EXIF orientation applied);
grayscale stays grayscale (but WebP has none: RGB there), alpha is kept where the format
has it, 16-bit input is written as 8-bit, and 32-bit input (float or integer) and
animated or multi-page files (of which only a frame would be used) are refused.
An embedded ICC colour profile is kept in PNG, JPEG, WebP and TIFF when the output keeps
its colour model (RGB or grayscale); a CMYK (or Lab) input's profile is dropped, not
converted: PIL's plain formula turns its pixels into RGB, written without a profile.
Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import string
import sys

from srno_jax.cli import (
    interrupted_status,
    logged_as,
    positive_int,
    print_safely,
    raise_if_stopped,
    stops_as_interrupts,
)
from srno_jax.errors import CheckpointError, ConfigError, DataError, SRNOError

DEFAULT_NAME = "{stem}_x{scale}.png"
FIELDS = ("stem", "ext", "scale", "width", "height")
BOMB_FIX = "raise the limit with --max_input_pixels"  # the advice in a decompression-bomb error
NAME_FIELDS = (
    "{stem} (input name without extension), {ext} (input extension), "
    "{scale} (to 6 significant digits: 3.7, 10; WIDTHxHEIGHT for --size), {width}, {height} (output)"
)


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to upscale: input file, output file and output (height, width)."""

    input: str
    output: str
    size: tuple[int, int]


def _size(text: str) -> tuple[int, int]:
    """'1920x1080' (width x height, as image editors write it) -> (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1920x1080")
    return int(m.group(2)), int(m.group(1))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("srno-jax")
    except PackageNotFoundError:
        return "unknown (the package is not installed: pip install -e .)"


def _parser() -> argparse.ArgumentParser:
    from PIL import Image

    from srno_jax.compiler import DEFAULT_CACHE_DIR
    from srno_jax.images import DEFAULT_QUALITY

    p = argparse.ArgumentParser(
        prog="srno-upscale",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[2],
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="INPUT... [OUTPUT]: image files or folders of images, then the output "
        "file (one input) or an existing output folder (unless --out_dir is given)",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="scale factor, any number > 1 (e.g. 3.7)")
    how.add_argument("--size", type=_size, help="output size as WIDTHxHEIGHT, e.g. 1920x1080")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint",
        help="a reference .pth (e.g. edsr-baseline_epoch-1000"
        ".pth), a training workdir, one of its step folders or an export "
        "such as examples/assets/demo_srno",
    )
    weights.add_argument(
        "--random_weights",
        action="store_true",
        help="try the tool with an UNTRAINED EDSR-baseline SRNO (the output is "
        "not a real super-resolution)",
    )
    p.add_argument("--out_dir", help="existing folder to write into; then every path is an input")
    p.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help=f"output name pattern in a folder (default {DEFAULT_NAME!r}); fields: {NAME_FIELDS}",
    )
    p.add_argument(
        "--quality", type=int, help=f"JPEG and WebP quality, 1..100 (default {DEFAULT_QUALITY})"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow outputs to replace existing files, including an image's own input "
        "(never another input)",
    )
    p.add_argument(
        "--max_input_pixels",
        type=positive_int,
        metavar="N",
        help="refuse input images whose header claims more pixels than N, a guard "
        f"against decompression bombs (default PIL's, {Image.MAX_IMAGE_PIXELS})",
    )
    p.add_argument(
        "--chunk_size",
        type=int,
        default=None,
        help="query points per chunk; lower it to use less memory",
    )
    p.add_argument(
        "--compilation_cache",
        default=DEFAULT_CACHE_DIR,
        metavar="DIR",
        help="persistent XLA cache, so that a rerun compiles nothing "
        f"(default {DEFAULT_CACHE_DIR}; '' turns it off)",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def expand_inputs(paths: list[str]) -> list[str]:
    """The image files named by `paths`: files as given, folders as their images (sorted),
    each file once (the first time it is named).

    Raises `DataError` for a missing path or a folder without images.
    """
    from srno_jax.images import IMAGE_EXTENSIONS, image_files

    files, seen = [], set()
    for path in paths:
        if os.path.isdir(path):
            found = image_files(path)
            if not found:
                raise DataError(f"folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(path):
            found = [path]
        else:
            raise DataError(f"image not found: {path}")
        for file in found:
            st = os.stat(file)
            if (st.st_dev, st.st_ino) not in seen:  # a folder and a file in it: once
                seen.add((st.st_dev, st.st_ino))
                files.append(file)
    return files


def output_name(pattern: str, input_path: str, scale_text: str, size: tuple[int, int]) -> str:
    """The output file name for `input_path` from `pattern` (fields: see NAME_FIELDS).

    size = output (height, width). Raises `ConfigError` for a field other than FIELDS
    written plainly (no attribute, index, conversion or format spec) or a pattern that is
    not a plain file name.
    """
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as e:  # an unmatched brace
        raise ConfigError(
            f"--name {pattern!r} is not a valid pattern ({e}); its fields are {NAME_FIELDS}"
        ) from None
    for _, field, spec, conversion in parts:
        if field is not None and (field not in FIELDS or spec or conversion):
            written = (
                field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            )
            raise ConfigError(
                f"--name {pattern!r}: {{{written}}} is not a field; write one of "
                f"{NAME_FIELDS} as it is"
            )
    stem, ext = os.path.splitext(os.path.basename(input_path))
    name = pattern.format(
        stem=stem, ext=ext.lstrip("."), scale=scale_text, height=size[0], width=size[1]
    )
    if not name or os.path.basename(name) != name:
        raise ConfigError(
            f"--name {pattern!r} gives {name!r}, not a file name; the output "
            "folder is --out_dir or the last argument"
        )
    return name


def check_output(
    path: str, size: tuple[int, int], own_input: str, inputs: list[str], overwrite: bool
) -> None:
    """Refuses, before any work, an output that cannot be written or would destroy an input.

    Checks that the folder exists and is writable, that `path` is not a folder, that its
    format can hold an image of size = (height, width) under its name
    (`images.check_savable`), and that it is none of `inputs`: `own_input` only with
    `overwrite`, another input never (it would be replaced before, or after, it is read).
    Raises `ConfigError` or `DataError` naming the path and the fix.
    """
    from srno_jax.images import check_savable

    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise DataError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"output folder {folder} is not writable; choose another output")
    if os.path.isdir(path):
        raise DataError(f"output {path} is a folder; give a file name or use --out_dir")
    check_savable(path, size)
    if not os.path.exists(path):
        return
    for other in inputs:
        if not os.path.samefile(path, other):
            continue
        if not os.path.samefile(other, own_input):
            raise DataError(
                f"the output for {own_input}, {path}, is another input image; writing it "
                "would replace that input: choose another name or folder (--overwrite "
                "only lets an image replace itself)"
            )
        if not overwrite:
            raise DataError(
                f"output {path} is an input image; writing it would destroy the "
                "input: choose another name, or pass --overwrite"
            )


def plan(args) -> list[Job]:
    """Every (input, output, size) of a command line, all checked before any work.

    Reads every input (so a bad image fails here, not after an hour of upscaling) and
    refuses outputs that clash with each other or with an input (`check_output`), or
    that exist already without --overwrite (`check_no_existing_outputs`).
    """
    from srno_jax.image_api import output_size
    from srno_jax.images import check_mode, open_image

    paths, out_dir, out_file = list(args.paths), args.out_dir, None
    if out_dir is None:
        if len(paths) < 2:
            raise ConfigError(
                "give an output: srno-upscale INPUT OUTPUT, an output folder as "
                "the last argument, or --out_dir FOLDER"
            )
        if os.path.isdir(paths[-1]):
            out_dir = paths.pop()
        elif len(paths) == 2 and not os.path.isdir(paths[0]):
            out_file = paths.pop()
        else:
            raise DataError(
                f"several inputs need an output folder, and {paths[-1]} is not an "
                "existing folder; create it, or pass --out_dir FOLDER"
            )
    elif not os.path.isdir(out_dir):
        raise DataError(f"--out_dir {out_dir} is not an existing folder; create it first")
    inputs = expand_inputs(paths)
    scale_text = f"{args.scale:g}" if args.scale is not None else f"{args.size[1]}x{args.size[0]}"
    jobs = []
    for path in inputs:
        image = open_image(path, orient=True, bomb_fix=BOMB_FIX, one_frame=True)
        check_mode(image, path)
        size = output_size((image.height, image.width), args.scale, args.size)
        out = out_file or os.path.join(out_dir, output_name(args.name, path, scale_text, size))
        check_output(out, size, path, inputs, args.overwrite)
        jobs.append(Job(path, out, size))
    seen = {}
    for job in jobs:
        key = os.path.normcase(os.path.abspath(job.output))
        if key in seen:
            names = {os.path.normcase(os.path.basename(p)) for p in (seen[key], job.input)}
            stems = {os.path.splitext(name)[0] for name in names}
            # Same name from two folders: no --name field tells them apart.
            fix = (
                "upscale them in separate runs, each with its own --out_dir"
                if len(names) == 1
                else f"put {{{'ext' if len(stems) == 1 else 'stem'}}} in --name"
            )
            raise ConfigError(
                f"{seen[key]} and {job.input} would both be written to {job.output}; {fix}"
            )
        seen[key] = job.input
    if not args.overwrite:
        check_no_existing_outputs(jobs)
    return jobs


def check_no_existing_outputs(jobs: list[Job]) -> None:
    """Refuses outputs that already exist (the caller lets --overwrite skip this): a
    mistyped command line, such as two inputs without an output folder, must not
    silently replace a file. Raises `DataError` naming the first and how many exist."""
    existing = [job.output for job in jobs if os.path.lexists(job.output)]
    if not existing:
        return
    n = len(existing)
    count = f" ({n} of the {len(jobs)} outputs exist)" if len(jobs) > 1 else ""
    raise DataError(
        f"output {existing[0]} already exists{count}; pass --overwrite to replace "
        f"{'it' if n == 1 else 'them'}, or choose another output name or --out_dir"
    )


def _model(args):
    from srno_jax import workdir as workdir_lib
    from srno_jax.checkpoints import read_checkpoint
    from srno_jax.models import init_variables, make_model

    if args.checkpoint:
        model, variables, source = read_checkpoint(args.checkpoint)
        if workdir_lib.resolve(args.checkpoint).is_dir():  # its newest step can change
            print(f"srno-upscale: model from {source}", file=sys.stderr)
        return model, variables
    print(
        "warning: --random_weights: using a randomly initialised EDSR-baseline SRNO. Its "
        "weights are UNTRAINED, so the output is NOT a real super-resolution.",
        file=sys.stderr,
    )
    model = make_model()
    return model, init_variables(model)


def _check_arguments(args) -> None:
    if not args.checkpoint and not args.random_weights:
        raise ConfigError(
            "--checkpoint is required: pass a reference .pth (e.g. the official "
            "edsr-baseline_epoch-1000.pth), a training workdir such as runs/demo, "
            "or examples/assets/demo_srno; --random_weights tries the tool "
            "with untrained weights"
        )
    from srno_jax import workdir as workdir_lib

    if args.checkpoint and not workdir_lib.resolve(args.checkpoint).exists():
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    for path in [*args.paths, *([args.out_dir] if args.out_dir else [])]:
        if workdir_lib.is_uri(path):
            raise DataError(
                f"{path}: srno-upscale reads and writes local files only; copy the images "
                "from the bucket first (gcloud storage cp), and the results back after"
            )
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError(f"--chunk_size must be >= 1, got {args.chunk_size}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality must be in 1..100, got {args.quality}")


def _check_quality(quality: int | None, jobs: list[Job]) -> None:
    from srno_jax.images import output_format

    if quality is not None and not any(output_format(j.output) in ("JPEG", "WEBP") for j in jobs):
        raise ConfigError(
            "--quality applies to JPEG and WebP outputs only; name the output "
            ".jpg or .webp, or drop --quality"
        )


@contextlib.contextmanager
def _input_pixel_limit(limit: int | None):
    """PIL's decompression-bomb limit set to `limit` (None: PIL's own), restored after."""
    from PIL import Image

    default = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = default


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with logged_as("srno-upscale"):
        return _run(args)


def _run(args) -> int:
    done = 0
    try:
        with stops_as_interrupts(), _input_pixel_limit(args.max_input_pixels):
            _check_arguments(args)
            jobs = plan(args)
            _check_quality(args.quality, jobs)
            from tqdm import tqdm

            from srno_jax.compiler import enable_compilation_cache
            from srno_jax.image_api import upscale
            from srno_jax.images import open_image, save_image

            enable_compilation_cache(args.compilation_cache)
            model, variables = _model(args)
            # disable=None: a bar on a terminal, none in logs and pipes.
            with tqdm(jobs, unit="image", disable=None, file=sys.stderr) as bar:
                say = True  # until stdout is gone
                for job in bar:
                    raise_if_stopped()
                    bar.set_postfix_str(os.path.basename(job.input))
                    image = open_image(job.input, orient=True, bomb_fix=BOMB_FIX)
                    out = upscale(
                        model, variables, image, size=job.size, chunk_size=args.chunk_size
                    )
                    raise_if_stopped()
                    # The input's colour profile (a phone's Display-P3), where it fits.
                    save_image(
                        job.output,
                        out,
                        args.quality,
                        image.info.get("icc_profile"),
                        replace=args.overwrite,
                    )
                    done += 1
                    # Progress lines must never stop the work (`| head -1`, a non-UTF-8 name).
                    line = f"wrote {job.output} ({job.size[1]}x{job.size[0]})"
                    try:
                        say = say and print_safely(line, write=bar.write)
                    except OSError as e:  # the images matter, not these lines: go on
                        say = False
                        print(
                            f"srno-upscale: cannot print to stdout: {e.strerror or e}",
                            file=sys.stderr,
                        )
    except SRNOError as e:
        print(f"srno-upscale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"srno-upscale: interrupted; {done} image(s) written", file=sys.stderr)
        return interrupted_status(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
