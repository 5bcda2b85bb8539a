"""The reference's evaluation protocol: LR/HR test pairs, test-time cell, PSNR and SSIM.

Layout everywhere: HWC numpy arrays. ``uint8`` images hold 0..255; float images hold
[0, 1]. The functions are pure numpy; reductions run in float64.
"""

from __future__ import annotations

import math

import numpy as np

from srno_jax.errors import ConfigError, DataError
from srno_jax.images import resize_bicubic

PROTOCOLS = ("benchmark", "div2k", None)

# The reference's gray coefficients (calc_psnr): applied to an RGB difference in [0, 1].
_Y_COEFFS = np.array([65.738, 129.057, 25.064]) / 256.0
# ITU-R BT.601 (MATLAB rgb2ycbcr) for RGB in [0, 1] -> Y in 16..235, as BasicSR's SSIM.
_YCBCR_COEFFS = np.array([65.481, 128.553, 24.966])


def check_scale(scale: float) -> float:
    """Returns `scale` if it is a valid evaluation scale: a finite number > 1.

    Scale 1 is refused: it has nothing to super-resolve, and its bicubic baseline is the
    identity, whose PSNR is infinite. Raises `ConfigError`.
    """
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float, np.number))
        or not (math.isfinite(scale) and scale > 1)
    ):
        raise ConfigError(
            f"scale {scale} is invalid: evaluation scales must be finite numbers "
            "> 1 (e.g. 2, 3.5, 4)"
        )
    return scale


def check_protocol(protocol: str | None) -> str | None:
    """Returns `protocol` if it is one of `PROTOCOLS`; raises `ConfigError` otherwise."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown PSNR protocol {protocol!r}; use 'div2k' or 'benchmark'")
    return protocol


def lr_side(hr_side: int, scale: float) -> int:
    """floor(hr_side / scale): the LR side of an HR side cropped to a multiple of the
    scale. The 1e-9 keeps exact multiples (333 / 3.7 = 89.999...) from flooring one
    pixel low."""
    return math.floor(hr_side / scale + 1e-9)


def covered_grid(lr_hw: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(H, W) of the HR grid that an LR image of size (h, w[, ...]) covers at `scale`:
    round(h * scale), round(w * scale) (Python round, half to even)."""
    return round(lr_hw[0] * scale), round(lr_hw[1] * scale)


def eval_sizes(hr_shape: tuple[int, ...], scale: float) -> tuple[int, int, int, int]:
    """Sizes of a test pair for an HR image of shape (H, W[, C]) at `scale`.

    Returns (h_lr, w_lr, h_hr, w_hr) with h_lr = `lr_side`(H, scale) and
    h_hr = round(h_lr * scale) (Python round), the same for W: the reference's
    ``SRImplicitDownsampled`` with ``inp_size=None``.

    Raises `ConfigError` for a scale that `check_scale` refuses, `DataError` when the
    image is smaller than one LR pixel at this scale, or when the scale is so close to 1
    that the pair's HR crop is no larger than its LR image (nothing to super-resolve).
    """
    check_scale(scale)
    h, w = int(hr_shape[0]), int(hr_shape[1])
    h_lr, w_lr = lr_side(h, scale), lr_side(w, scale)
    if h_lr < 1 or w_lr < 1:
        raise DataError(
            f"an image of {h}x{w} is smaller than one LR pixel at scale {scale:g}; "
            "use a smaller scale or a larger image"
        )
    h_hr, w_hr = covered_grid((h_lr, w_lr), scale)
    if (h_hr, w_hr) == (h_lr, w_lr):
        raise DataError(
            f"at scale {scale} an image of {h}x{w} gives a {h_lr}x{w_lr} input and an "
            "output of the same size: nothing to super-resolve; use a larger scale"
        )
    return h_lr, w_lr, h_hr, w_hr


def make_eval_pair(hr: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(lr, hr_cropped) uint8 test pair from an (H, W, 3) uint8 HR image.

    The HR image is cropped from the top-left to (h_hr, w_hr) of `eval_sizes` and the LR
    image is its PIL bicubic downsample to (h_lr, w_lr), as the reference's ``test.py``.
    Raises `DataError` for a non-uint8 or non-(H, W, 3) image, `ConfigError` for a bad scale.
    """
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise DataError(f"expected an (H, W, 3) uint8 image, got {hr.dtype} of shape {hr.shape}")
    h_lr, w_lr, h_hr, w_hr = eval_sizes(hr.shape, scale)
    hr = np.ascontiguousarray(hr[:h_hr, :w_hr])
    return resize_bicubic(hr, (h_lr, w_lr)), hr


def eval_cell(hr_size: tuple[int, int], scale: float) -> np.ndarray:
    """float32 (2,) cell for querying an HR grid of hr_size = (H, W) at `scale`.

    cell = (2 / H, 2 / W) * max(scale / 4, 1): the reference's test-time "mcell", which
    enlarges the cell for scales beyond the training range x1..x4 (out of distribution).
    Rounded as the reference does: 2 / H and the factor each to float32, then their
    float32 product (one rounding of the float64 product differs by 1 ulp in about a
    fifth of the sizes beyond x4).
    """
    h, w = hr_size
    factor = np.float32(max(scale / 4.0, 1.0))
    return np.array([2.0 / h, 2.0 / w], np.float32) * factor


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...) float64: sum of channels weighted by (65.738, 129.057, 25.064) / 256.

    The reference's Y for PSNR; it is applied to a difference of images, so it has no
    +16 offset.
    """
    return np.asarray(img, np.float64) @ _Y_COEFFS


def rgb_to_ycbcr_y(img: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> (...) float64 Y of BT.601 YCbCr, in [16/255, 235/255].

    Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255, MATLAB's rgb2ycbcr and BasicSR's
    ``bgr2ycbcr(y_only=True)``; for SSIM on images.
    """
    return (16.0 + np.asarray(img, np.float64) @ _YCBCR_COEFFS) / 255.0


def default_protocol(dataset_name: str) -> str:
    """'div2k' for names starting with 'div2k' (any case), else 'benchmark' (Set5, ...)."""
    return "div2k" if dataset_name.lower().startswith("div2k") else "benchmark"


def _shave(protocol: str | None, scale: float) -> int:
    """Border pixels dropped at each side: ceil(scale) for 'benchmark', ceil(scale) + 6 for
    'div2k', 0 for None. The reference slices with the scale itself (integer scales only);
    ceil extends that to non-integer scales."""
    if check_protocol(protocol) is None:
        return 0
    return math.ceil(scale) + (6 if protocol == "div2k" else 0)


def check_evaluable(
    hw: tuple[int, int], protocol: str | None, scale: float, with_ssim: bool = False
) -> None:
    """Raises `DataError` unless an (H, W) = hw image keeps at least one pixel (11 x 11
    with SSIM, its window) after `psnr`'s shave for `protocol` and `scale`."""
    shave, least = _shave(protocol, scale), 11 if with_ssim else 1
    h, w = hw
    if min(h, w) - 2 * shave < least:
        raise DataError(
            f"a {h}x{w} image is too small to evaluate after shaving {shave} pixels "
            f"at each border (needs at least {least} pixels left)"
        )


def _check_pair(
    sr: np.ndarray, hr: np.ndarray, protocol: str | None, scale: float, with_ssim: bool
) -> None:
    if sr.shape != hr.shape or sr.ndim != 3 or sr.shape[2] != 3:
        raise DataError(
            f"expected two (H, W, 3) images of one shape, got {sr.shape} and {hr.shape}"
        )
    for name, img in (("sr", sr), ("hr", hr)):
        # uint8 or [0, 255] floats would give a PSNR some 48 dB off without any error.
        if not np.issubdtype(img.dtype, np.floating):
            raise DataError(f"{name} is {img.dtype}: pass float images in [0, 1] (uint8 / 255)")
        if not np.isfinite(img).all():
            raise DataError(f"{name} has NaN or infinite values (a broken model or input)")
        if img.size and not (img.min() >= 0 and img.max() <= 1):
            raise DataError(
                f"{name} has values in [{img.min():g}, {img.max():g}]: pass float images "
                "in [0, 1] (clamp the prediction; divide 8-bit images by 255)"
            )
    check_evaluable(sr.shape[:2], protocol, scale, with_ssim)


def psnr(sr: np.ndarray, hr: np.ndarray, protocol: str | None = None, scale: float = 1) -> float:
    """PSNR in dB of float (H, W, 3) images in [0, 1] (sr already clamped), as the
    reference's ``calc_psnr(sr, hr, dataset=protocol, scale=scale, rgb_range=1)``.

    'benchmark': Y of the difference (`rgb_to_y`), shave ceil(scale) pixels at each
    border; 'div2k': RGB, shave ceil(scale) + 6; None: RGB, no shave.
    PSNR = -10 log10(mean squared error), the mean in float64; identical images give inf.
    Raises `ConfigError` for an unknown protocol, `DataError` for mismatched or too small
    images, or images that are not floats in [0, 1].
    """
    _check_pair(sr, hr, protocol, scale, False)
    shave = _shave(protocol, scale)
    diff = np.asarray(sr, np.float64) - np.asarray(hr, np.float64)
    if protocol == "benchmark":
        diff = rgb_to_y(diff)
    h, w = diff.shape[:2]
    mse = np.mean(diff[shave : h - shave, shave : w - shave] ** 2)
    return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


def _gaussian_filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation of a 2-D array with the kernel g on both axes, 'valid' region."""
    win = np.lib.stride_tricks.sliding_window_view
    return win(win(x, len(g), axis=0) @ g, len(g), axis=1) @ g


def ssim(sr: np.ndarray, hr: np.ndarray, protocol: str | None = None, scale: float = 1) -> float:
    """SSIM of float (H, W, 3) images in [0, 1] on the Y channel, as the SR literature
    (BasicSR's ``calculate_ssim(..., test_y_channel=True)``, MATLAB-equivalent) computes it.

    Borders are shaved as in `psnr` for `protocol` and `scale`; Y = 255 * `rgb_to_ycbcr_y`
    in float64 (not quantised); Gaussian window 11 x 11, sigma 1.5; C1 = (0.01 * 255)^2,
    C2 = (0.03 * 255)^2; the mean of the SSIM map over the valid region (no padding).
    Raises `ConfigError` for an unknown protocol, `DataError` for mismatched images or
    fewer than 11 x 11 pixels left after shaving.
    """
    _check_pair(sr, hr, protocol, scale, True)
    shave = _shave(protocol, scale)
    h, w = sr.shape[:2]
    x, y = (255.0 * rgb_to_ycbcr_y(im[shave : h - shave, shave : w - shave]) for im in (sr, hr))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_filter_valid(x, g), _gaussian_filter_valid(y, g)
    vx = _gaussian_filter_valid(x * x, g) - mx * mx
    vy = _gaussian_filter_valid(y * y, g) - my * my
    cxy = _gaussian_filter_valid(x * y, g) - mx * my
    ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(ssim_map.mean())
