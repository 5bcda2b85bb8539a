"""Runs a few training steps in a fresh process (device count set by XLA_FLAGS) and saves params.

Usage: python tests/train_worker.py IMAGE_DIR WORKDIR OUT.npz STEPS
"""

import sys

import jax
import numpy as np
from test_train import tiny_config

from srno_jax import load_checkpoint, train, train_cli


def main(image_dir, workdir, out, steps):
    train.setup_logging()  # progress on stderr, e.g. "resumed from step k"
    config = tiny_config(image_dir, total_steps=int(steps))
    train_cli.run(config, workdir)
    model, variables = load_checkpoint(workdir)
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    np.savez(
        out,
        devices=jax.device_count(),
        **{"/".join(k.key for k in path): np.asarray(v) for path, v in flat},
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
