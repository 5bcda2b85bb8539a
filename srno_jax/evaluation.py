"""Benchmark evaluation as the reference's ``test.py``: datasets, upsamplers, PSNR table.

For each HR image and scale s: (lr, hr) = `metrics.make_eval_pair`; the upsampler
queries the full HR grid (cell = `metrics.eval_cell`, "mcell" beyond x4) and returns
float (H, W, 3) in [0, 1] (model output * 0.5 + 0.5, clamped; not quantised); PSNR by
`metrics.psnr` under the dataset's protocol; the reported number is the mean over images.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

from srno_jax.errors import ConfigError, DataError
from srno_jax.images import IMAGE_EXTENSIONS, image_files, load_image, resize_bicubic
from srno_jax.metrics import PROTOCOLS, default_protocol, make_eval_pair, psnr, ssim

_BENCHMARKS = {"set5": "Set5", "set14": "Set14", "b100": "B100", "bsd100": "B100",
               "urban100": "Urban100", "manga109": "Manga109"}

# (lr uint8 (h, w, 3), HR size (H, W), scale) -> float (H, W, 3) in [0, 1]
Upsampler = Callable[[np.ndarray, tuple, float], np.ndarray]


def resolve_dataset(name: str, data_dir: str | None) -> tuple[str, str]:
    """(display name, folder of HR images) for a dataset name or a folder path.

    An existing folder is used as is (named after itself, or its parent when it is
    called 'HR'); Set5, Set14, B100, Urban100, Manga109 (any case) are
    ``<data_dir>/benchmark/<Name>/HR``; 'div2k' or 'DIV2K_valid' is
    ``<data_dir>/DIV2K_valid_HR``. Raises `DataError` when the folder does not exist.
    """
    if os.path.isdir(name):
        path = os.path.normpath(name)
        base = os.path.basename(path)
        return (os.path.basename(os.path.dirname(path)) if base == "HR" else base), path
    key = name.lower()
    if key in _BENCHMARKS:
        display, parts = _BENCHMARKS[key], ("benchmark", _BENCHMARKS[key], "HR")
    elif key in ("div2k", "div2k_valid"):
        display, parts = "DIV2K", ("DIV2K_valid_HR",)
    else:
        raise DataError(f"dataset {name!r} is neither a folder nor one of Set5, Set14, B100, "
                        "Urban100, Manga109, div2k")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs --data_dir (the folder holding benchmark/ "
                        "and DIV2K_valid_HR/)")
    path = os.path.join(data_dir, *parts)
    if not os.path.isdir(path):
        raise DataError(f"dataset {name!r}: folder {path} not found")
    return display, path


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

    return lambda lr, hr_size, scale: super_resolve(model, variables, lr, hr_size, scale,
                                                    chunk_size)


def score_image(upsampler: Upsampler, hr_uint8: np.ndarray, scale: float, protocol: str | None,
                with_ssim: bool = False) -> dict:
    """{'psnr'[, 'ssim']} of one HR image at `scale`: the reference protocol for one image."""
    lr, hr = make_eval_pair(hr_uint8, scale)
    sr = upsampler(lr, hr.shape[:2], scale)
    hr = hr.astype(np.float64) / 255.0
    row = {"psnr": psnr(sr, hr, protocol, scale)}
    if with_ssim:
        row["ssim"] = ssim(sr, hr, protocol, scale)
    return row


def comparison_strip(upsampler: Upsampler, hr_uint8: np.ndarray, scale: float,
                     size: int = 96) -> np.ndarray:
    """A (size, 3 * size, 3) uint8 strip of the centre: bicubic | upsampler | ground truth."""
    lr, hr = make_eval_pair(hr_uint8, scale)
    sr = np.round(upsampler(lr, hr.shape[:2], scale) * 255).astype(np.uint8)
    bic = resize_bicubic(lr, hr.shape[:2])
    y, x = max(hr.shape[0] - size, 0) // 2, max(hr.shape[1] - size, 0) // 2
    return np.concatenate([im[y:y + size, x:x + size] for im in (bic, sr, hr)], axis=1)


def evaluate(upsampler: Upsampler, datasets: list[tuple[str, str]], scales: list[float],
             protocol: str | None = None, per_image: bool = False, progress: bool = True) -> list[dict]:
    """Mean PSNR per (dataset, scale).

    Args:
      datasets: (name, folder) pairs as `resolve_dataset` returns.
      scales: evaluation scales, each >= 1.
      protocol: 'div2k' or 'benchmark' for all; None: `metrics.default_protocol(name)`.
      per_image: add 'per_image': [{'image', 'psnr', 'ssim'}] to each result.
    Returns:
      [{'dataset', 'scale', 'protocol', 'psnr', 'images'}, ...] in datasets x scales order.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use 'div2k' or 'benchmark'")
    for s in scales:
        if not (math.isfinite(s) and s >= 1):
            raise ConfigError(f"scale {s} is invalid: evaluation scales must be finite and >= 1")
    files = {name: list_images(folder) for name, folder in datasets}
    bar = _progress(sum(len(f) for f in files.values()) * len(scales), progress)
    results = []
    for name, _ in datasets:
        proto = protocol or default_protocol(name)
        for s in scales:
            rows = []
            for path in files[name]:
                bar.set_description(f"{name} x{s:g}")
                row = score_image(upsampler, load_image(path), s, proto, per_image)
                rows.append({"image": os.path.basename(path), **row})
                bar.update(1)
            result = {"dataset": name, "scale": s, "protocol": proto,
                      "psnr": float(np.mean([r["psnr"] for r in rows])), "images": len(rows)}
            if per_image:
                result["per_image"] = rows
            results.append(result)
    bar.close()
    return results


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", leave=False)


def format_table(results: list[dict]) -> str:
    """Rows datasets, columns scales ('x2', 'x3.5', ...), PSNR in dB with 2 decimals."""
    scales = list(dict.fromkeys(r["scale"] for r in results))
    names = list(dict.fromkeys(r["dataset"] for r in results))
    cell = {(r["dataset"], r["scale"]): r["psnr"] for r in results}
    width = max(len(n) for n in names + ["dataset"])
    lines = [f"{'dataset':<{width}} " + " ".join(f"{'x' + format(s, 'g'):>7}" for s in scales)]
    for n in names:
        lines.append(f"{n:<{width}} " + " ".join(
            f"{cell[n, s]:7.2f}" if (n, s) in cell else f"{'-':>7}" for s in scales))
    return "\n".join(lines)


def validate(model, params, images, scales, protocol: str = "benchmark"):
    """Mean PSNR of the model and of PIL bicubic over `images` at each scale.

    Returns {scale: (model_psnr, bicubic_psnr)} under the reference protocol.
    """
    sr = model_upsampler(model, {"params": params})
    return {s: tuple(float(np.mean([score_image(up, hr, s, protocol)["psnr"]
                                    for hr in images]))
                     for up in (sr, bicubic_upsampler))
            for s in scales}


def format_results(results: dict) -> str:
    """A Markdown table of {scale: (psnr, bicubic psnr)}."""
    scales = sorted(results)
    head = "| method | " + " | ".join(f"x{s:g}" for s in scales) + " |"
    rule = "|---|" + "---|" * len(scales)
    rows = [f"| {name} | " + " | ".join(f"{results[s][i]:.2f}" for s in scales) + " |"
            for i, name in ((1, "bicubic"), (0, "SRNO"))]
    return "\n".join([head, rule, *rows])
