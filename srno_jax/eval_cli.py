"""``srno-eval`` (or ``python eval.py``): PSNR tables of SRNO checkpoints, like the paper's.

  srno-eval --checkpoint bicubic,edsr-baseline_epoch-1000.pth --data Set5,Set14,div2k \\
      --data_dir load --scales 2,3,4,6,12 --json results.json

Evaluates each --checkpoint (a reference .pth, an Orbax training workdir, step folder or
export, or 'bicubic') on each --data folder under the reference's protocol
(`srno_jax.evaluation`) and prints a Markdown table: one row per checkpoint, columns
dataset x scale, mean PSNR in dB. Every argument, image and checkpoint is checked, and
the --json path tried, before the first forward pass (an existing file is kept when a
check fails); the JSON is then rewritten after each table cell, so an interrupted run
leaves the finished cells (``"complete": false``) and prints their table. Unreadable
images are skipped with a warning and counted in the table (--strict stops instead).
Errors print one line on stderr and exit with status 2; Ctrl-C exits with 130, SIGTERM
with 143 (both keeping the cells done, in the table and --json). The JSON is complete
before anything is printed, and printing cannot fail a finished run (a closed pipe,
``| head``, or a file name the terminal cannot encode).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from srno_jax.cli import (
    interrupted_status,
    logged_as,
    positive_int,
    print_safely,
    raise_if_stopped,
    stops_as_interrupts,
)
from srno_jax.errors import ConfigError, DataError, SRNOError

_PROG = "srno-eval"
_DEFAULT_SCALES = [2.0, 3.0, 4.0]


def _scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[2])
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a .pth, an Orbax workdir, step folder or export, or 'bicubic'; several "
        "comma-separated or with the flag repeated, one table row each",
    )
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="comma-separated dataset names (Set5, Set14, B100, Urban100, Manga109, "
        "div2k) or folders: of HR images, or paired (HR/ with LR/ or X2/ X3/ ...); the "
        "flag may be repeated",
    )
    p.add_argument("--data_dir", default=None, help="folder holding benchmark/ and DIV2K_valid_HR/")
    p.add_argument(
        "--scales",
        type=_scales,
        action="append",
        default=None,
        help="e.g. 2,3,4,6,12 (each > 1; default 2,3,4; the flag may be repeated); "
        "paired folders use their pairs' own scales",
    )
    p.add_argument("--protocol", default=None, help="'div2k' or 'benchmark' (default: by dataset)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument(
        "--per_image", action="store_true", help="add per-image PSNR and SSIM to the JSON"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image instead of skipping it",
    )
    p.add_argument("--chunk_size", type=positive_int, default=None, help="query points per chunk")
    p.add_argument(
        "--max_output_pixels",
        type=positive_int,
        default=None,
        help="refuse HR images larger than this many pixels "
        "(default: srno_jax.image_api.MAX_OUTPUT_PIXELS, 2**27)",
    )
    p.add_argument(
        "--compilation_cache",
        default=None,
        help="persistent XLA compilation cache folder (default "
        "~/.cache/srno_jax/xla; '' turns it off)",
    )
    p.add_argument(
        "--no_progress",
        action="store_true",
        help="no progress bar (it is off anyway when stderr is not a terminal)",
    )
    return p


def _names(values: list[str], flag: str) -> list[str]:
    """The comma-separated names of a flag's values, stripped, each once, in order."""
    names = list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"{flag} names nothing; give one or more, comma-separated")
    return names


def _upsampler(checkpoint: str, chunk_size: int | None):
    """(the upsampler, what was read: the step folder and its step, or the .pth file)."""
    from srno_jax import evaluation

    if checkpoint == "bicubic":
        return evaluation.bicubic_upsampler, "bicubic"
    from srno_jax.checkpoints import read_checkpoint

    model, variables, source = read_checkpoint(checkpoint)
    return evaluation.model_upsampler(model, variables, chunk_size), source


def _json_safe(x):
    """`x` with non-finite floats (an infinite PSNR: a prediction equal to the ground
    truth) as None, since JSON has no Infinity."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _is_eval_json(path) -> bool:
    """Whether `path` holds a document that `_JsonOutput.write` wrote."""
    try:
        with path.open("rb") as f:
            if f.read(1) != b"{":  # a checkpoint or an image is not read whole
                return False
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"checkpoints", "complete", "results"} <= doc.keys()


class _JsonOutput:
    """The --json file. Created checks that it can be written, leaving an existing file
    as it is; each `write` replaces it whole, through a temporary file and a rename, so
    it is valid JSON at every moment. An existing file is replaced only if it is an
    earlier srno-eval result: anything else (a checkpoint, an image) is a mistyped path.
    A failed write (a full disk) leaves the file as the last write left it and sets
    `failed`, since a retry would fail again."""

    def __init__(self, path: str, checkpoints: list[str], sources: dict[str, str]):
        from etils import epath

        self.path, self.checkpoints, self.sources = epath.Path(path), checkpoints, sources
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self.cells, self.failed = None, False  # the cells the file holds; None: not written
        if self.path.is_dir():
            raise DataError(f"cannot write --json {self.path}: it is a folder; give a file name")
        if self.path.exists() and not _is_eval_json(self.path):
            raise DataError(
                f"--json {self.path} exists and is not an srno-eval result (a checkpoint or "
                "an image?); it is left as it is: choose another file name"
            )
        self._write(None)

    def write(self, results: list[dict], complete: bool, timing: dict | None = None) -> None:
        doc = {
            "checkpoints": self.checkpoints,
            "read": self.sources,
            "complete": complete,
            "results": _json_safe(results),
        }
        if timing is not None:
            doc["timing"] = timing
        self._write(json.dumps(doc, indent=1, allow_nan=False))
        self.cells = len(results)

    def _write(self, text: str | None) -> None:
        """Writes `text` beside the file, then renames it over the file; None only tries
        that a file can be written there."""
        try:
            self._tmp.write_text(text or "")
            if text is None:
                self._tmp.unlink()
            else:
                self._tmp.replace(self.path)
        except OSError as e:
            self.failed = True
            try:
                self._tmp.unlink(missing_ok=True)  # a truncated copy is of no use
            except OSError:
                pass
            if text is None:
                fix = "choose a writable path"
            else:
                n = self.cells
                kept = "as it was" if n is None else f"with the first {n} cell{'s' * (n != 1)}"
                fix = f"the file is left {kept}; free some space or choose another path"
            raise DataError(f"cannot write --json {self.path}: {e.strerror or e}; {fix}") from None


def _timing(clock, wall: float, cache_dir: str | None) -> tuple[dict, str]:
    """(the JSON's 'timing', the line for stderr) of a run that took `wall` seconds, from a
    `compiler.CompileClock`."""
    total = clock.compile_s
    timing = {
        "wall_s": round(wall, 3),
        "compile_s": round(total, 3),
        "trace_lower_s": round(clock.tracing, 3),
        "xla_compile_s": round(clock.xla, 3),
        "compilations": clock.compilations,
        "cache_hits": clock.cache_hits,
    }
    line = (
        f"{wall:.1f} s in all, {total:.1f} s ({total / wall:.0%}) compiling: "
        f"{clock.tracing:.1f} s tracing and lowering, {clock.xla:.1f} s in XLA for "
        f"{clock.compilations} compilations, {clock.cache_hits} of them loaded from the "
        f"persistent cache ({cache_dir or 'off'})"
    )
    return timing, line


def _evaluate(args, results: list[dict], state: dict) -> None:
    """Plans, checks, loads and evaluates, appending each table cell to `results`."""
    from tqdm import tqdm

    from srno_jax import evaluation
    from srno_jax import workdir as workdir_lib
    from srno_jax.image_api import MAX_OUTPUT_PIXELS

    checkpoints = _names(args.checkpoint, "--checkpoint")
    datasets = [evaluation.resolve_dataset(n, args.data_dir) for n in _names(args.data, "--data")]
    tasks = evaluation.plan(
        datasets,
        _DEFAULT_SCALES if args.scales is None else [s for group in args.scales for s in group],
        args.protocol,
        strict=args.strict,
        max_output_pixels=(
            MAX_OUTPUT_PIXELS if args.max_output_pixels is None else args.max_output_pixels
        ),
    )
    warn = lambda msg: tqdm.write(f"{_PROG}: {msg}", file=sys.stderr)
    if args.scales is not None:
        for path in dict.fromkeys(t.dataset for t in tasks if t.paired):
            warn(
                f"note: --scales does not apply to the paired folder {path}; it is evaluated "
                "at its pairs' own scales"
            )
    x = evaluation.scale_labels(t.scale for t in tasks)  # as the table shows them
    skips = {}  # one warning per image and reason, with the scales it applies to
    for t in tasks:
        for image, why in t.skipped:
            skips.setdefault((t.dataset, image, why), []).append(x[t.scale])
    for (dataset, image, why), at in skips.items():
        warn(f"warning: skipping {dataset}/{image} at {', '.join(at)}: {why}")
    upsamplers, sources = [], {}
    for c in checkpoints:
        upsampler, sources[c] = _upsampler(c, args.chunk_size)
        upsamplers.append((c, upsampler))
        if c != "bicubic" and workdir_lib.resolve(c).is_dir():  # its newest step can change
            warn(f"{c}: read {sources[c]}")
    if args.json:
        state["json"] = _JsonOutput(args.json, checkpoints, sources)
    total = len(checkpoints) * sum(len(t.items) for t in tasks)
    state["bar"] = bar = tqdm(
        total=total, unit="img", leave=False, disable=True if args.no_progress else None
    )

    def scored(image):
        raise_if_stopped()
        bar.update(1)

    for checkpoint, upsampler in upsamplers:
        for task in tasks:
            raise_if_stopped()
            bar.set_description(f"{task.dataset} {x[task.scale]}")
            row = evaluation.evaluate_task(
                upsampler,
                task,
                per_image=args.per_image,
                strict=args.strict,
                on_image=scored,
                on_skip=lambda image, why: warn(f"warning: skipping {task.dataset}/{image}: {why}"),
            )
            results.append({"checkpoint": checkpoint, **row})
            if "json" in state:
                state["json"].write(results, complete=False)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with logged_as(_PROG):
        return _run(args)


def _run(args) -> int:
    start = time.perf_counter()
    results, state, status = [], {}, 1
    clock = None
    try:
        from srno_jax import compiler

        cache = compiler.enable_compilation_cache(
            compiler.DEFAULT_CACHE_DIR if args.compilation_cache is None else args.compilation_cache
        )
        with stops_as_interrupts(), compiler.CompileClock() as clock:
            _evaluate(args, results, state)
        status = 0
    except SRNOError as e:
        print_safely(f"{_PROG}: error: {e}", sys.stderr)
        status = 2
    except KeyboardInterrupt as e:
        print_safely(f"{_PROG}: interrupted", sys.stderr)
        status = interrupted_status(e)
    finally:
        if "bar" in state:
            state["bar"].close()
        finished, timing, line = status == 0, None, None
        if clock is not None and "bar" in state:  # the work began
            timing, line = _timing(clock, time.perf_counter() - start, cache)
        # The JSON before any output, which then cannot cost it its last cells or timing.
        # A failure before any work keeps the old file; a failed write would fail again.
        if "json" in state and "bar" in state and not state["json"].failed:
            try:
                state["json"].write(results, complete=finished, timing=timing)
            except SRNOError as e:
                print_safely(f"{_PROG}: error: {e}", sys.stderr)
                status = 2
        if results:
            from srno_jax.evaluation import format_table

            incomplete = f"\n\n(incomplete: the evaluation stopped after {len(results)} cells)"
            try:
                print_safely(format_table(results) + ("" if finished else incomplete))
            except OSError as e:
                print_safely(
                    f"{_PROG}: error: cannot print the table: {e.strerror or e}", sys.stderr
                )
                status = 2
        if line and clock.compilations:
            print_safely(f"{_PROG}: {line}", sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
