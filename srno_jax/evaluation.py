"""Benchmark evaluation as the reference's ``test.py``: datasets, scoring, tables.

For each HR image and scale s: (lr, hr) = `metrics.make_eval_pair` (LR = PIL bicubic of
the HR cropped to a multiple of s). For a paired folder (`pairs.find_pairs`) the given
LR image is used instead, with its HR cropped to the LR grid (`pairs.pair_images`), and
s is the pair's scale. The upsampler queries the full HR grid (cell =
`metrics.eval_cell`, "mcell" beyond x4) and returns float (H, W, 3) in [0, 1] (model
output * 0.5 + 0.5, clamped; not quantised); PSNR by `metrics.psnr` under the dataset's
protocol; the reported number is the mean over images.

Images are read as training reads them (`images.load_image`): the pixels as stored. EXIF
orientation is ignored, as in the reference (the benchmark PNGs carry none); an LR
image and its HR are both read as stored, so a pair stays aligned.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import numpy as np
from etils import epath

from srno_jax import pairs
from srno_jax.errors import CheckpointError, ConfigError, DataError
from srno_jax.images import (
    IMAGE_EXTENSIONS,
    check_mode,
    image_files,
    load_image,
    open_image,
    resize_bicubic,
)
from srno_jax.metrics import (
    check_evaluable,
    check_protocol,
    check_scale,
    covered_grid,
    default_protocol,
    eval_sizes,
    make_eval_pair,
    psnr,
    ssim,
)
from srno_jax.workdir import is_uri

_BENCHMARKS = {
    "set5": "Set5",
    "set14": "Set14",
    "b100": "B100",
    "bsd100": "B100",
    "urban100": "Urban100",
    "manga109": "Manga109",
}

# (lr uint8 (h, w, 3), HR size (H, W), scale) -> float (H, W, 3) in [0, 1]
Upsampler = Callable[[np.ndarray, tuple, float], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to score: its HR file and, in a paired folder, its LR file."""

    name: str
    hr_path: str
    lr_path: str | None = None  # None: the LR is made from the HR with PIL bicubic


@dataclasses.dataclass(frozen=True)
class Task:
    """One cell of the table: a dataset at one scale.

    ``path`` (the normalised folder) identifies the dataset; ``dataset`` is its display
    name, unique among the datasets evaluated together. ``skipped`` holds
    (image, reason) for the images found unusable before any work; ``paired`` tells a
    paired folder, whose scale is its pairs'.
    """

    dataset: str
    path: str
    scale: float
    protocol: str
    items: tuple[Item, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    paired: bool = False


def resolve_dataset(name: str, data_dir: str | None) -> tuple[str, str]:
    """(display name, folder) for a dataset name or a folder path.

    Set5, Set14, B100, Urban100, Manga109 (any case) are ``<data_dir>/benchmark/<Name>/HR``
    (or ``hr``, as SRNO's configs spell it); 'div2k' or 'DIV2K_valid' is
    ``<data_dir>/DIV2K_valid_HR`` or, as LIIF's ``load/`` lays it out,
    ``<data_dir>/div2k/DIV2K_valid_HR``: the first that exists. With `data_dir` given,
    these names always mean those folders, even where a folder of the same name is in
    the working directory (``./Set5`` names that one). Any other existing folder, local
    or in a bucket (``gs://...``), is used as is, normalised (`_normpath`); it is named
    after itself, or its parent when it is called 'HR'. Raises `DataError` naming the
    folders looked for when none exists.
    """
    key = name.lower()
    known = key in _BENCHMARKS or key in ("div2k", "div2k_valid")
    if epath.Path(name).is_dir() and not (known and data_dir is not None):
        path = _normpath(name)
        return _label(path, 1), path
    if key in _BENCHMARKS:
        display = _BENCHMARKS[key]
        layouts = [("benchmark", display, "HR"), ("benchmark", display, "hr")]
    elif key in ("div2k", "div2k_valid"):
        display, layouts = "DIV2K", [("DIV2K_valid_HR",), ("div2k", "DIV2K_valid_HR")]
    else:
        raise DataError(
            f"dataset {name!r} is neither a folder nor one of Set5, Set14, B100, "
            "Urban100, Manga109, div2k"
        )
    if data_dir is None:
        raise DataError(
            f"dataset {name!r} needs --data_dir (the folder holding benchmark/ and DIV2K_valid_HR/)"
        )
    paths = [_normpath(os.path.join(data_dir, *parts)) for parts in layouts]
    for path in paths:
        if epath.Path(path).is_dir():
            return display, path
    here = (
        f"; to evaluate ./{name} instead, pass it as ./{name}" if epath.Path(name).is_dir() else ""
    )
    raise DataError(f"dataset {name!r}: no folder {' or '.join(paths)}{here}")


def _normpath(path: str) -> str:
    """`os.path.normpath` of a local path; a URI (``gs://b/x/``) without its trailing
    slash, its ``//`` kept."""
    return path.rstrip("/") if is_uri(path) else os.path.normpath(path)


def _label(path: str, parts: int) -> str:
    """The last `parts` components of `path`, leaving out a final 'HR' component."""
    names = [p for p in path.split(os.sep) if p not in ("", ".")]
    if len(names) > 1 and names[-1] == "HR":
        names = names[:-1]
    return "/".join(names[-parts:]) or path


def unique_datasets(datasets: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(display name, folder) pairs with each folder once and every display name unique.

    Folders that share a display name are shown with as many of their trailing path
    components as make the names unique (``a/imgs`` and ``b/imgs``, not ``imgs`` twice).
    """
    names = {}
    for name, path in datasets:
        names.setdefault(path, name)
    paths = list(names)
    for parts in range(2, 1 + max(len(p.split(os.sep)) for p in paths)):
        clash = [p for p in paths if sum(names[q] == names[p] for q in paths) > 1]
        if not clash:
            break
        for p in clash:
            names[p] = _label(p, parts)
    clash = [p for p in paths if sum(names[q] == names[p] for q in paths) > 1]
    for p in clash:  # only the same folder spelt two ways is left: show the paths
        names[p] = p
    return [(names[p], p) for p in paths]


def check_image(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read whole (`images.open_image`) so that any
    fault shows before the evaluation begins.

    Raises `DataError` naming the file when it is missing, unreadable, truncated, larger
    than PIL's decompression-bomb limit, or of a mode `load_image` refuses (32-bit,
    `images.check_mode`).
    """
    img = open_image(path)
    check_mode(img, path)
    return img.height, img.width


def plan(
    datasets: list[tuple[str, str]],
    scales: list[float],
    protocol: str | None = None,
    *,
    strict: bool = False,
    max_output_pixels: int | None = None,
) -> list[Task]:
    """The tasks of an evaluation, every argument and image checked before any work.

    Args:
      datasets: (display name, folder) pairs as `resolve_dataset` returns; made unique by
        `unique_datasets`.
      scales: evaluation scales (`metrics.check_scale`) for folders of HR images; a paired
        folder is evaluated at its pairs' own scales instead.
      protocol: 'div2k' or 'benchmark' for all; None: `metrics.default_protocol(name)`.
      strict: raise on the first unusable image instead of skipping it.
      max_output_pixels: the largest HR grid (H x W) to predict; None: no limit.
    Returns:
      [Task] in datasets x scales order (a paired folder's scales ascending). An image
      that cannot be read, or is too small for a scale, is left out of the task with its
      reason in ``skipped``.
    Raises:
      ConfigError: a bad scale or protocol, no dataset, no scales, or an image whose
        output exceeds max_output_pixels. DataError: a missing or empty folder, a paired
        layout that does not match (`pairs.find_pairs`), or with `strict` an unusable image.
    """
    if protocol is not None:
        check_protocol(protocol)
    for s in scales:
        check_scale(s)
    if not datasets:
        raise ConfigError("no dataset given; name one or more (e.g. Set5,div2k or a folder)")
    tasks = []
    given = {}  # each folder's own name: the display name may grow a parent ('a/DIV2K')
    for name, folder in datasets:
        given.setdefault(folder, name)
    for name, folder in unique_datasets(datasets):
        proto = protocol or default_protocol(given[folder])
        by_scale, paired = _items_by_scale(folder, scales)
        size = functools.cache(check_image)  # an HR image serves every scale
        for s, items in by_scale.items():
            kept, skipped = [], []
            for item in items:
                try:
                    hw = _hr_grid(size, item, s)
                    check_evaluable(hw, proto, s)
                except (DataError, ConfigError) as e:
                    if strict:
                        raise DataError(f"{name}: {item.name}: {e}") from None
                    skipped.append((item.name, str(e)))
                    continue
                if max_output_pixels is not None and hw[0] * hw[1] > max_output_pixels:
                    raise ConfigError(
                        f"{item.hr_path} at x{s:g} needs a {hw[0]}x{hw[1]} output "
                        f"({hw[0] * hw[1]} pixels), more than the limit of {max_output_pixels}; "
                        "raise it with --max_output_pixels or leave the image out"
                    )
                kept.append(item)
            tasks.append(Task(name, folder, s, proto, tuple(kept), tuple(skipped), paired))
    return tasks


def _items_by_scale(folder: str, scales: list[float]) -> tuple[dict[float, list[Item]], bool]:
    """({scale: items}, whether `folder` is paired): every image at every scale, or a
    paired folder's pairs grouped by their own scales, ascending."""
    found = pairs.find_pairs(folder)
    if found is None:
        if not scales:
            raise ConfigError("--scales is empty; give the scales to evaluate, e.g. 2,3,4")
        items = [Item(os.path.basename(p), p) for p in list_images(folder)]
        return {s: items for s in scales}, False
    by_scale = {}
    for p in sorted(found, key=lambda p: p.scale):
        by_scale.setdefault(p.scale, []).append(Item(p.name, p.hr_path, p.lr_path))
    return by_scale, True


def _hr_grid(size: Callable[[str], tuple[int, int]], item: Item, scale: float) -> tuple[int, int]:
    """(H, W) of the HR grid scored for `item` at `scale`, its files' sizes from `size`
    (`check_image`): the crop of `metrics.eval_sizes`, or for a pair the grid its LR
    covers (as `pairs.pair_images`)."""
    hr_hw = size(item.hr_path)
    if item.lr_path is None:
        return eval_sizes(hr_hw, scale)[2:]
    check_scale(scale)  # a pair's scale comes from its files, e.g. 1 for equal sizes
    return covered_grid(size(item.lr_path), scale)


def list_images(folder: str) -> list[str]:
    """Sorted paths of the image files (by extension) in `folder`; DataError if none."""
    files = image_files(folder)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def bicubic_upsampler(lr: np.ndarray, hr_size: tuple, scale: float) -> np.ndarray:
    """The PIL-bicubic baseline: uint8 resize to hr_size, / 255."""
    return resize_bicubic(lr, hr_size).astype(np.float64) / 255.0


def model_upsampler(model, variables, chunk_size: int | None = None) -> Upsampler:
    """An upsampler running SRNO with exact chunked inference (`image_api.super_resolve`)."""
    from srno_jax.image_api import super_resolve

    return lambda lr, hr_size, scale: super_resolve(
        model, variables, lr, hr_size, scale, chunk_size
    )


def score_pair(
    upsampler: Upsampler,
    lr: np.ndarray,
    hr: np.ndarray,
    scale: float,
    protocol: str | None,
    with_ssim: bool = False,
) -> dict:
    """{'psnr'[, 'ssim']} of upsampling the uint8 `lr` to its uint8 ground truth `hr`;
    'ssim' is None for an image too small for SSIM's 11 x 11 window after the shave
    (which still has a PSNR: asking for SSIM never changes which images are scored).
    Raises `CheckpointError` when the prediction is not finite: a broken model, not an
    image to skip while the others are averaged.

    The prediction is of the grid the LR image covers (`metrics.covered_grid`), cropped
    to `hr`: a pair's HR image falls short of that grid where its LR side was rounded
    up, and predicting `hr`'s size would stretch the output over the LR image instead."""
    sr = upsampler(lr, covered_grid(lr.shape, scale), scale)[: hr.shape[0], : hr.shape[1]]
    if not np.isfinite(sr).all():
        raise CheckpointError(
            f"the model predicts NaN or infinite values at x{scale:g} ({hr.shape[0]}x"
            f"{hr.shape[1]} output); its parameters are broken (a diverged run?), so no "
            "PSNR of it means anything: evaluate an earlier checkpoint"
        )
    hr = hr.astype(np.float64) / 255.0
    row = {"psnr": psnr(sr, hr, protocol, scale)}
    if with_ssim:
        try:
            check_evaluable(hr.shape[:2], protocol, scale, with_ssim=True)
        except DataError:
            row["ssim"] = None
        else:
            row["ssim"] = ssim(sr, hr, protocol, scale)
    return row


def score_image(
    upsampler: Upsampler,
    hr_uint8: np.ndarray,
    scale: float,
    protocol: str | None,
    with_ssim: bool = False,
) -> dict:
    """{'psnr'[, 'ssim']} of one HR image at `scale`: the reference protocol for one image."""
    return score_pair(upsampler, *make_eval_pair(hr_uint8, scale), scale, protocol, with_ssim)


def score_item(
    upsampler: Upsampler, item: Item, scale: float, protocol: str, with_ssim: bool = False
) -> dict:
    """`score_image` of an HR file, or `score_pair` of a paired folder's files."""
    if item.lr_path is None:
        return score_image(upsampler, load_image(item.hr_path), scale, protocol, with_ssim)
    lr, hr = pairs.pair_images(pairs.Pair(item.name, item.hr_path, item.lr_path, scale))
    return score_pair(upsampler, lr, hr, scale, protocol, with_ssim)


def evaluate_task(
    upsampler: Upsampler,
    task: Task,
    *,
    per_image: bool = False,
    strict: bool = False,
    on_image: Callable[[str], None] = lambda image: None,
    on_skip: Callable[[str, str], None] = lambda image, reason: None,
) -> dict:
    """Mean PSNR of `upsampler` over a task's images.

    An image that fails to load is skipped (`on_skip(image, reason)`) unless `strict`,
    which raises its `DataError`. `on_image(name)` follows each image.
    Returns:
      {'dataset', 'path', 'scale', 'protocol', 'psnr', 'images', 'skipped'[, 'per_image']}:
      'psnr' the mean over the 'images' scored (None when none was), 'skipped' a list of
      {'image', 'reason'} (the task's own and those found here), 'per_image' a list of
      {'image', 'psnr', 'ssim'}.
    """
    rows, skipped = [], [{"image": n, "reason": r} for n, r in task.skipped]
    for item in task.items:
        try:
            rows.append(
                {
                    "image": item.name,
                    **score_item(upsampler, item, task.scale, task.protocol, per_image),
                }
            )
        except DataError as e:
            if strict:
                raise DataError(f"{task.dataset}: {item.name}: {e}") from None
            skipped.append({"image": item.name, "reason": str(e)})
            on_skip(item.name, str(e))
        on_image(item.name)
    result = {
        "dataset": task.dataset,
        "path": task.path,
        "scale": task.scale,
        "protocol": task.protocol,
        "psnr": float(np.mean([r["psnr"] for r in rows])) if rows else None,
        "images": len(rows),
        "skipped": skipped,
    }
    if per_image:
        result["per_image"] = rows
    return result


def comparison_strip(
    upsampler: Upsampler, hr_uint8: np.ndarray, scale: float, size: int = 96
) -> np.ndarray:
    """A (size, 3 * size, 3) uint8 strip of the centre: bicubic | upsampler | ground truth."""
    lr, hr = make_eval_pair(hr_uint8, scale)
    sr = np.round(upsampler(lr, hr.shape[:2], scale) * 255).astype(np.uint8)
    bic = resize_bicubic(lr, hr.shape[:2])
    y, x = max(hr.shape[0] - size, 0) // 2, max(hr.shape[1] - size, 0) // 2
    return np.concatenate([im[y : y + size, x : x + size] for im in (bic, sr, hr)], axis=1)


def scale_labels(scales) -> dict[float, str]:
    """{scale: label} as tables and messages show scales: 'x2', 'x2.5', with `:g`'s 6
    significant digits, or with as many more as tell every two scales apart ('x2' and
    'x2.0000001', not 'x2' twice)."""
    scales = set(scales)
    for digits in range(6, 17):
        labels = {s: f"x{s:.{digits}g}" for s in scales}
        if len(set(labels.values())) == len(scales):
            return labels
    return {s: "x" + repr(s).removesuffix(".0") for s in scales}  # exact: shortest round trip


def format_table(results: list[dict]) -> str:
    """A Markdown table like the paper's: one row per method, columns dataset x scale.

    Each result is a dict with 'scale', 'psnr' (dB, or None when no image was scored)
    and optionally 'checkpoint' (the row; '' when absent), 'dataset' (the column
    header reads 'Set5 x2', or 'x2' without one), 'images' and 'skipped'. Rows and
    columns keep their first-seen order; PSNR has 2 decimals, '-' marks a missing cell;
    scales read as `scale_labels` gives them, so no two columns share a header.
    A cell with skipped images gets a '*' and a note below the table with its counts.
    Results with a 'protocol' add a last line naming each protocol and its datasets, since
    it is chosen by folder name (`metrics.default_protocol`).
    """
    columns = list(dict.fromkeys((r.get("dataset", ""), r["scale"]) for r in results))
    methods = list(dict.fromkeys(r.get("checkpoint", "") for r in results))
    cells = {(r.get("checkpoint", ""), r.get("dataset", ""), r["scale"]): r for r in results}
    x = scale_labels(s for _, s in columns)
    head = ["method"] + [f"{d} {x[s]}".strip() for d, s in columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * len(columns)]
    notes = []
    for m in methods:
        row = [m]
        for d, s in columns:
            r = cells.get((m, d, s))
            if r is None:
                row.append("-")
                continue
            text = "-" if r["psnr"] is None else f"{r['psnr']:.2f}"
            if r.get("skipped"):
                text += "*"
                n = len(r["skipped"])
                k = r.get("images", 0)
                notes.append(
                    f"* {m} {d} {x[s]}: {k} image{'s' * (k != 1)} scored, {n} "
                    f"skipped ({', '.join(x['image'] for x in r['skipped'][:3])}"
                    f"{' ...' if n > 3 else ''})"
                )
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    by_protocol = {}
    for r in results:
        if r.get("protocol") is not None:
            by_protocol.setdefault(r["protocol"], {})[r.get("dataset") or "all"] = None
    if by_protocol:
        notes.append(
            "PSNR protocol: "
            + "; ".join(f"{p} ({_PROTOCOLS[p]}) for {', '.join(d)}" for p, d in by_protocol.items())
        )
    return "\n".join(lines + ([""] + list(dict.fromkeys(notes)) if notes else []))


_PROTOCOLS = {"benchmark": "Y channel, shave ceil(s)", "div2k": "RGB, shave ceil(s) + 6"}


def check_validation_images(images, scales, protocol: str = "benchmark") -> None:
    """Raises `DataError` naming the first of the (H, W, 3) HR `images` that `validate`
    could not score at one of `scales` under `protocol` (too small after the shave)."""
    for i, img in enumerate(images):
        for s in scales:
            try:
                check_evaluable(eval_sizes(img.shape, s)[2:], protocol, s)
            except DataError as e:
                raise DataError(
                    f"image {i} ({img.shape[0]}x{img.shape[1]}) cannot be validated at x{s:g}: {e}"
                ) from None


def validate(model, params, images, scales, protocol: str = "benchmark"):
    """Mean PSNR of the model and of PIL bicubic over `images` at each scale.

    Returns {scale: (model_psnr, bicubic_psnr)} under the reference protocol.
    """
    sr = model_upsampler(model, {"params": params})
    return {
        s: tuple(
            float(np.mean([score_image(up, hr, s, protocol)["psnr"] for hr in images]))
            for up in (sr, bicubic_upsampler)
        )
        for s in scales
    }


def format_results(results: dict) -> str:
    """`format_table` of {scale: (psnr, bicubic psnr)}: rows 'bicubic' and 'SRNO',
    columns the scales ascending."""
    return format_table(
        [
            {"checkpoint": name, "scale": s, "psnr": results[s][i]}
            for i, name in ((1, "bicubic"), (0, "SRNO"))
            for s in sorted(results)
        ]
    )
