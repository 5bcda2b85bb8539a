"""Worst differences from the reference's golden vectors, per golden set.

  python benchmarks/golden_report.py [GOLDEN_DIR]
      (default: ../shared/golden beside the repository, else tests/golden)

tests/test_golden.py asserts the tolerances; this prints how far inside them we are.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from srno_jax import load_checkpoint  # noqa: E402
from srno_jax.checkpoints import params_to_torch  # noqa: E402
from srno_jax.train import l1_loss  # noqa: E402

CASES = ("grid_x2.5", "grid_x7_mcell", "train_batch_x3.3")


def report(folder: Path) -> str:
    model, variables = load_checkpoint(folder / "checkpoint.pth")
    z = np.load(folder / "cases.npz")
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))
    apply = jax.jit(model.apply)
    feat = pred = 0.0
    for c in CASES:
        inp = nhwc(z[f"{c}/inp"])
        feat = max(feat, float(jnp.abs(encode(variables, inp) - nhwc(z[f"{c}/feat"])).max()))
        out = apply(variables, inp, jnp.asarray(z[f"{c}/coord"]), jnp.asarray(z[f"{c}/cell"]))
        pred = max(pred, float(jnp.abs(out - nhwc(z[f"{c}/pred"])).max()))
    c = "train_batch_x3.3"
    inp, coord, cell = (
        nhwc(z[f"{c}/inp"]),
        jnp.asarray(z[f"{c}/coord"]),
        jnp.asarray(z[f"{c}/cell"]),
    )
    batch = {"inp": inp, "coord": coord, "cell": cell, "gt": (nhwc(z[f"{c}/gt"]) - 0.5) / 0.5}
    loss, grads = jax.jit(jax.value_and_grad(l1_loss), static_argnums=1)(
        variables["params"], model, batch
    )
    grad = max(
        np.linalg.norm(g - z[f"grad/{k}"]) / np.linalg.norm(z[f"grad/{k}"])
        for k, g in params_to_torch(grads, model).items()
    )
    return (
        f"{folder.name:16} features {feat:.1e}  predictions {pred:.1e}  "
        f"loss {abs(float(loss) - float(z[f'{c}/loss'])):.1e}  gradients {grad:.1e} (relative)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared" / "golden"
    root = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else shared
        if shared.is_dir()
        else repo / "tests" / "golden"
    )
    sets = [root / n for n in ("small_edsr_srno", "edsr_srno", "rdn_srno")]
    sets = [s for s in sets if (s / "cases.npz").exists()]
    if len(sys.argv) > 2:
        sys.exit(__doc__.split("\n\n")[1] + "\nerror: give one GOLDEN_DIR at most")
    if not sets:
        sys.exit(__doc__.split("\n\n")[1] + f"\nerror: no golden set in {root}")
    for folder in sets:
        print(report(folder), flush=True)
