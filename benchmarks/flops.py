"""Analytic FLOPs of the reference SRNO, read from a model (`srno_jax.models.make_model`).

Counted: matmuls and convolutions, 2 per multiply-add, as the reference computes them
(our fused kernel integrals do fewer; a rate in these FLOPs is "reference FLOPs per
second"). Left out: biases, activations, layer norms, gathers and the bilinear residual.
"""

from __future__ import annotations

from srno_jax.models import EDSR, RDN, SRNO, Projection
from srno_jax.models.encoders import RDN_CONFIGS


def conv_flop(k: int, c_in: int, c_out: int, h: int, w: int) -> int:
    """A k x k 'same' convolution on an h x w map: 2 k^2 c_in c_out h w."""
    return 2 * k * k * c_in * c_out * h * w


def encoder_flop(encoder, h: int, w: int) -> int:
    """The encoder on one h x w image (3 input channels).

    EDSR: head 3 -> C, two C -> C convs per block and the body conv, all 3 x 3.
    RDN: sfe1 3 -> G0 and sfe2 (k x k); per block, conv j (3 x 3) G0 + j G -> G and the
    1 x 1 fusion G0 + C G -> G0; gff_0 (1 x 1) D G0 -> G0 and gff_1 (k x k).
    """
    if isinstance(encoder, EDSR):
        c = encoder.n_feats
        return conv_flop(3, 3, c, h, w) + (2 * encoder.n_resblocks + 1) * conv_flop(3, c, c, h, w)
    if isinstance(encoder, RDN):
        blocks, convs, growth = RDN_CONFIGS[encoder.config]
        g0, k = encoder.g0, encoder.kernel_size
        block = sum(conv_flop(3, g0 + j * growth, growth, h, w) for j in range(convs)) + conv_flop(
            1, g0 + convs * growth, g0, h, w
        )
        return (
            conv_flop(k, 3, g0, h, w)
            + conv_flop(k, g0, g0, h, w)
            + blocks * block
            + conv_flop(1, blocks * g0, g0, h, w)
            + conv_flop(k, g0, g0, h, w)
        )
    raise TypeError(f"no FLOP model for encoder {type(encoder).__name__}")


def operator_flop(model: SRNO, n: int) -> int:
    """The neural operator at n query points (one image), as the reference computes it:

    lifting         2 n (4 (C + 2) + 2) width        (C: the encoder's output channels)
    per kernel integral (two), d = width / heads:
      qkv           2 n width (3 width)
      k^T v, q(kv)  2 n heads d^2, twice
      o_proj1, 2    2 n width^2, twice
    projection      2 n (width hidden + hidden 3)
    """
    width, d = model.width, model.width // model.heads
    lifting = 2 * n * (4 * (model.encoder.out_dim + 2) + 2) * width
    integral = 2 * n * width * 3 * width + 2 * 2 * n * model.heads * d * d + 2 * 2 * n * width**2
    hidden, out = Projection.hidden, Projection.out_channels
    return lifting + 2 * integral + 2 * n * (width * hidden + hidden * out)


def forward_flop(model: SRNO, batch: int, lr_hw: tuple[int, int], queries: int) -> int:
    """One forward pass: `batch` LR inputs of lr_hw = (h, w), `queries` points each."""
    return batch * (encoder_flop(model.encoder, *lr_hw) + operator_flop(model, queries))


def train_step_flop(model: SRNO, batch: int, lr_hw: tuple[int, int], queries: int) -> int:
    """A training step as 3 forward passes (forward, and backward at twice its cost)."""
    return 3 * forward_flop(model, batch, lr_hw, queries)
