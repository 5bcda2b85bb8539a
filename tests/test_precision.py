"""bfloat16 compute with float32 parameters (compute_dtype='bfloat16'): bounded difference."""

import jax
import jax.numpy as jnp
import numpy as np

from srno_jax.train import l1_loss


def bf16(model):
    return model.clone(dtype="bfloat16", encoder=model.encoder.clone(dtype="bfloat16"))


def test_bf16_prediction_close_to_float32(small_golden):
    model, variables, z = small_golden
    inputs = [
        jnp.asarray(z["grid_x7_mcell/inp"].transpose(0, 2, 3, 1)),
        jnp.asarray(z["grid_x7_mcell/coord"]),
        jnp.asarray(z["grid_x7_mcell/cell"]),
    ]
    p32 = jax.jit(model.apply)(variables, *inputs)
    p16 = jax.jit(bf16(model).apply)(variables, *inputs)
    assert p16.dtype == jnp.float32  # the output is float32 whatever the compute dtype
    diff = np.abs(np.asarray(p16) - np.asarray(p32))
    # Normalised units ([-1, 1]); 1e-2 is 1.3 levels of an 8-bit image. Measured: max 2e-3.
    assert diff.max() < 1e-2 and diff.mean() < 2e-3, (diff.max(), diff.mean())
    assert diff.max() > 0  # the bfloat16 path really computes in bfloat16


def test_bf16_training_loss_and_gradient_close(small_golden):
    model, variables, z = small_golden
    case = "train_batch_x3.3"
    inp = jnp.asarray(z[f"{case}/inp"].transpose(0, 2, 3, 1))
    coord, cell = jnp.asarray(z[f"{case}/coord"]), jnp.asarray(z[f"{case}/cell"])
    gt = (jnp.asarray(z[f"{case}/gt"].transpose(0, 2, 3, 1)) - 0.5) / 0.5
    batch = {"inp": inp, "coord": coord, "cell": cell, "gt": gt}

    def loss_grad(m):
        return jax.jit(jax.value_and_grad(l1_loss), static_argnums=1)(variables["params"], m, batch)

    (l32, g32), (l16, g16) = loss_grad(model), loss_grad(bf16(model))
    assert abs(float(l16) - float(l32)) < 1e-3
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(g16))  # float32 parameters
    n32 = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(g32)))
    nd = np.sqrt(
        sum(
            float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))
        )
    )
    assert nd / n32 < 0.1, nd / n32
