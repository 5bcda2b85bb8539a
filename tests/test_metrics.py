"""Tests of srno_jax.metrics: the golden PSNR cases of the reference and hand-made checks."""

import math

import numpy as np
import pytest
from conftest import SMALL_GOLDEN

from srno_jax.errors import ConfigError, DataError
from srno_jax.images import resize_bicubic
from srno_jax.metrics import (
    check_evaluable,
    covered_grid,
    default_protocol,
    eval_cell,
    eval_sizes,
    make_eval_pair,
    psnr,
    rgb_to_y,
    rgb_to_ycbcr_y,
    ssim,
)

_CASES = SMALL_GOLDEN / "cases.npz"


def _golden(name):
    """Golden psnr case as HWC float32 arrays (hr, lr, bicubic_pil) and the reference PSNR."""
    with np.load(_CASES) as z:
        hr, lr, bic = (
            z[f"psnr/{name}/{k}"].transpose(1, 2, 0) for k in ("hr", "lr", "bicubic_pil")
        )
        return hr, lr, bic, float(z[f"psnr/{name}/psnr"])


def _u8(x):
    return (x * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    "name,protocol,scale", [("benchmark_x4", "benchmark", 4), ("div2k_x2", "div2k", 2)]
)
def test_golden_psnr_cases(name, protocol, scale):
    hr, lr, bic, ref = _golden(name)
    lr_u8, hr_u8 = make_eval_pair(_u8(hr), scale)
    np.testing.assert_array_equal(lr_u8, _u8(lr))
    np.testing.assert_array_equal(hr_u8, _u8(hr))
    np.testing.assert_array_equal(resize_bicubic(lr_u8, hr.shape[:2]), _u8(bic))
    assert abs(psnr(bic, hr, protocol, scale) - ref) < 0.005


def test_make_eval_pair_crops_top_left():
    hr = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    lr, hr_c = make_eval_pair(hr, 4)
    assert lr.shape == (9, 10, 3) and lr.dtype == np.uint8
    np.testing.assert_array_equal(hr_c, hr[:36, :40])
    with pytest.raises(DataError):
        make_eval_pair(hr.astype(np.float32), 4)


def test_eval_sizes():
    assert eval_sizes((333, 500), 3.7) == (90, 135, 333, 500)  # 333 / 3.7 is 89.999... in floats
    assert eval_sizes((300, 451, 3), 2.5) == (120, 180, 300, 450)
    assert eval_sizes((100, 100), 1.01) == (99, 99, 100, 100)  # one pixel larger: a task
    with pytest.raises(DataError, match="nothing to super-resolve"):
        eval_sizes((100, 100), 1.0000001)  # 99 x 99 -> 99 x 99
    for bad in (0.5, 1, math.inf, math.nan, True):
        with pytest.raises(ConfigError, match="scale"):
            eval_sizes((64, 64), bad)
    with pytest.raises(DataError, match="smaller than one LR pixel"):
        eval_sizes((5, 64), 6)


def test_covered_grid():
    assert covered_grid((5, 3), 2.5) == (12, 8)  # 12.5 and 7.5 round half to even
    assert covered_grid((60, 90, 3), 2) == (120, 180)


def test_check_evaluable():
    check_evaluable((7, 20), "benchmark", 3)  # 7 - 2 * 3 = 1 pixel left
    with pytest.raises(DataError, match="too small"):
        check_evaluable((6, 20), "benchmark", 3)
    with pytest.raises(DataError, match="11 pixels"):
        check_evaluable((20, 20), "div2k", 2, with_ssim=True)  # 20 - 2 * 8 = 4 < 11
    with pytest.raises(ConfigError, match="protocol"):
        check_evaluable((20, 20), "set5", 2)


def test_eval_cell_mcell():
    np.testing.assert_allclose(eval_cell((60, 50), 2), [2 / 60, 2 / 50], rtol=1e-7)
    np.testing.assert_allclose(eval_cell((60, 50), 6), [1.5 * 2 / 60, 1.5 * 2 / 50], rtol=1e-7)
    assert eval_cell((60, 50), 6).dtype == np.float32
    # The reference rounds twice (float32 2 / H times the float32 factor): at H = 12, x7
    # that is 0.2916667, one ulp from the float64 product's rounding 0.29166666.
    cell = eval_cell((12, 12), 7)
    assert cell[0] == np.float32(2 / 12) * np.float32(1.75)
    assert cell[0] != np.float32(2 / 12 * 1.75)


def test_eval_cell_golden_mcell():
    with np.load(_CASES) as z:
        np.testing.assert_array_equal(
            eval_cell((70, 84), 7), z["grid_x7_mcell/cell"].reshape(-1, 2)[0]
        )


def test_y_coefficients():
    assert rgb_to_y(np.ones(3)) == pytest.approx((65.738 + 129.057 + 25.064) / 256)
    assert rgb_to_y(np.array([0.0, 1.0, 0.0])) == pytest.approx(129.057 / 256)
    assert rgb_to_ycbcr_y(np.zeros(3)) == pytest.approx(16 / 255)
    assert rgb_to_ycbcr_y(np.ones(3)) == pytest.approx(235 / 255)


def test_psnr_identical_is_inf():
    img = np.random.default_rng(1).random((20, 20, 3))
    assert psnr(img, img) == math.inf
    assert psnr(img, img, "benchmark", 2) == math.inf


def test_psnr_constant_error():
    hr = np.full((20, 24, 3), 0.5)
    assert psnr(hr + 0.1, hr) == pytest.approx(20.0, abs=1e-9)
    assert psnr(hr + 0.1, hr, "div2k", 2) == pytest.approx(20.0, abs=1e-9)
    y = 0.1 * (65.738 + 129.057 + 25.064) / 256
    assert psnr(hr + 0.1, hr, "benchmark", 3) == pytest.approx(-20 * math.log10(y), abs=1e-9)


def test_psnr_shave_removes_borders():
    hr = np.full((30, 30, 3), 0.5)
    sr = hr.copy()
    sr[:3], sr[-3:], sr[:, :3], sr[:, -3:] = 0, 1, 0, 1
    assert psnr(sr, hr, "benchmark", 3) == math.inf
    assert psnr(sr, hr, "benchmark", 2.5) == math.inf  # non-integer scale: shave ceil(2.5) = 3
    assert psnr(sr, hr, "benchmark", 2) < math.inf
    sr[9, 15] = 0  # inside the div2k border of x3 (3 + 6 = 9 pixels)
    assert psnr(sr, hr, "div2k", 3) < math.inf
    assert psnr(sr, hr, "div2k", 4) == math.inf


def test_psnr_bad_input():
    img = np.zeros((10, 10, 3))
    with pytest.raises(ConfigError, match="div2k"):
        psnr(img, img, "set5", 2)
    with pytest.raises(DataError):
        psnr(img, np.zeros((10, 11, 3)))
    with pytest.raises(DataError):
        psnr(img, img, "div2k", 4)
    with pytest.raises(DataError, match="uint8 / 255"):
        psnr(img.astype(np.uint8), img.astype(np.uint8))
    with pytest.raises(DataError, match=r"hr has values in \[255, 255\]"):
        psnr(img, np.full_like(img, 255.0))
    with pytest.raises(DataError, match="NaN"):
        ssim(np.full_like(img, np.nan), img)


def test_default_protocol():
    assert default_protocol("DIV2K_valid") == "div2k"
    assert default_protocol("div2k") == "div2k"
    for name in ("Set5", "Set14", "B100", "Urban100", "benchmark", "my_photos"):
        assert default_protocol(name) == "benchmark"


def _ssim_naive(x, y):
    """BasicSR's _ssim with an explicit 11 x 11 window loop over the valid region."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / 4.5)
    win = np.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (win * a).sum(), (win * b).sum()
            va, vb = (win * a * a).sum() - ma**2, (win * b * b).sum() - mb**2
            cab = (win * a * b).sum() - ma * mb
            vals.append(
                (2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return np.mean(vals)


def test_ssim():
    rng = np.random.default_rng(2)
    hr = rng.random((18, 21, 3))
    sr = np.clip(hr + 0.1 * rng.standard_normal(hr.shape), 0, 1)
    assert ssim(hr, hr, "benchmark", 2) == pytest.approx(1.0, abs=1e-12)
    value = ssim(sr, hr)
    assert value < 1
    y = lambda im: 16 + im @ np.array([65.481, 128.553, 24.966])
    assert value == pytest.approx(_ssim_naive(y(sr), y(hr)), abs=1e-12)
    assert ssim(sr, hr, "benchmark", 2) == pytest.approx(
        _ssim_naive(y(sr[2:-2, 2:-2]), y(hr[2:-2, 2:-2])), abs=1e-12
    )


def test_ssim_constant_images():
    a, b = np.full((12, 12, 3), 0.2), np.full((12, 12, 3), 0.6)
    ma, mb = 255 * rgb_to_ycbcr_y(a[0, 0]), 255 * rgb_to_ycbcr_y(b[0, 0])
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * ma * mb + c1) / (ma**2 + mb**2 + c1), abs=1e-9)
    with pytest.raises(DataError):
        ssim(a, b, "benchmark", 1)  # 12 - 2 < 11 pixels left
