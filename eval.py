"""Evaluates SRNO checkpoints (or the PIL-bicubic baseline) under the reference's PSNR
protocol: the repository's front door to `srno_jax.eval_cli` (installed as ``srno-eval``).

  python eval.py --checkpoint bicubic,edsr-baseline_epoch-1000.pth --data Set5,Set14,div2k \\
      --data_dir load --scales 2,3,4,6,12 --json results.json

See ``python eval.py --help``.
"""

import sys

from srno_jax.eval_cli import main

if __name__ == "__main__":
    sys.exit(main())
