"""The sampling functions on hand-made cases: ties, borders, non-square inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from srno_jax.coords import make_coord, nearest_index, sample_bilinear
from srno_jax.models import lifting_inputs


def test_make_coord_values_and_layout():
    np.testing.assert_array_equal(make_coord((1,))[..., 0], [0.0])
    np.testing.assert_array_equal(make_coord((2,))[..., 0], [-0.5, 0.5])
    np.testing.assert_allclose(make_coord((4,))[..., 0], [-0.75, -0.25, 0.25, 0.75])
    c = make_coord((3, 5))  # non-square: [..., 0] is the row, [..., 1] the column
    assert c.shape == (3, 5, 2) and c.dtype == np.float32
    np.testing.assert_allclose(c[:, 0, 0], [-2 / 3, 0, 2 / 3], atol=1e-7)
    np.testing.assert_allclose(c[0, :, 1], [-0.8, -0.4, 0, 0.4, 0.8], atol=1e-7)
    assert (c[:, :, 0] == c[:, :1, 0]).all() and (c[:, :, 1] == c[:1, :, 1]).all()


def test_make_coord_is_torchs_float32_arithmetic():
    """float32(-1 + 1/n) + float32(2/n) * i, rounded per operation (not one fused rounding)."""
    for n in (3, 7, 10, 70, 84, 333):
        i = np.arange(n, dtype=np.float32)
        expected = np.float32(-1 + 1 / n) + np.float32(2 / n) * i
        np.testing.assert_array_equal(make_coord((n,))[..., 0], expected)


@pytest.mark.parametrize(
    "c, size, expected",
    [
        (-0.5, 4, 0),  # position 0.5: a tie, rounds to the even index 0
        (0.0, 4, 2),  # 1.5 -> 2
        (0.5, 4, 2),  # 2.5 -> 2 (half to even, not half up)
        (0.0, 2, 0),  # 0.5 -> 0
        (0.0, 3, 1),  # a pixel centre
        (-1.0, 5, 0),  # left border: -0.5 -> -0 -> 0
        (1.0, 5, 4),  # right border: 4.5 -> 4
        (1.0, 4, 3),  # 3.5 -> 4, outside; clipped to the last pixel
        (-0.99, 3, 0),
    ],
)
def test_nearest_index_ties_and_borders(c, size, expected):
    assert int(nearest_index(jnp.float32(c), size)) == expected


def _torch_bilinear_border(img, y, x):
    """torch grid_sample(bilinear, border, align_corners=False) for one point, by hand."""
    h, w = img.shape[:2]
    py = min(max((y + 1) * h / 2 - 0.5, 0), h - 1)
    px = min(max((x + 1) * w / 2 - 0.5, 0), w - 1)
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    fy, fx = py - y0, px - x0
    return (1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1]) + fy * (
        (1 - fx) * img[y1, x0] + fx * img[y1, x1]
    )


def test_sample_bilinear_non_square_and_borders():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((3, 5, 2)).astype(np.float32)
    centres = make_coord((3, 5)).reshape(1, -1, 2)
    out = sample_bilinear(jnp.asarray(img[None]), jnp.asarray(centres))[0]
    np.testing.assert_allclose(out, img.reshape(-1, 2), atol=1e-6)  # centres give pixels
    pts = np.array(
        [[-1, -1], [1, 1], [-1.5, 0.3], [0.2, 2.0], [0.0, 0.0], [-0.3, 0.7], [1 / 3, -0.6]],
        np.float32,
    )
    out = sample_bilinear(jnp.asarray(img[None]), jnp.asarray(pts[None]))[0]
    expected = [_torch_bilinear_border(img, y, x) for y, x in pts]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    mid = sample_bilinear(jnp.asarray(img[None]), jnp.asarray([[[-2 / 3, -0.6]]], jnp.float32))
    np.testing.assert_allclose(mid[0, 0], (img[0, 0] + img[0, 1]) / 2, atol=1e-6)


def test_lifting_weights_are_bilinear_and_sum_to_one():
    """The golden x7 case's sizes: some HR centres coincide with LR centres bit for bit."""
    (h, w), (hh, ww) = (10, 12), (70, 84)
    feat = jnp.ones((1, h, w, 1))
    coord = jnp.asarray(make_coord((hh, ww)).reshape(1, -1, 2))
    z = np.asarray(lifting_inputs(feat, coord, jnp.full((1, 2), 2 / hh)))[0]
    assert z.shape == (hh * ww, 4 * (1 + 2) + 2)
    weights = z[:, 8:12]  # features are 1, so the weighted features are the weights
    np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-6)
    # Bilinear: neighbour i weighs the area |rel_y rel_x| of the diagonally opposite one.
    rel = z[:, 0:8].reshape(-1, 4, 2).astype(np.float64)
    area = np.abs(rel[..., 0] * rel[..., 1]) + 1e-9
    np.testing.assert_allclose(weights, area[:, ::-1] / area.sum(-1, keepdims=True), atol=1e-6)
    # Where an HR centre is an LR centre every neighbour shares its row or column: all four
    # areas are 1e-9 and the weights 1/4 each.
    coincident = (np.abs(z[:, 0:8]).reshape(-1, 4, 2).min(-1) == 0).all(-1)
    assert coincident.any()
    np.testing.assert_allclose(weights[coincident], 0.25, atol=1e-6)
    np.testing.assert_allclose(
        z[:, -2:], np.broadcast_to([2 / hh * h, 2 / hh * w], (hh * ww, 2)), rtol=1e-6
    )
