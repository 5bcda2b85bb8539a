"""Trains SRNO: `python main.py --config configs/default.py --workdir runs/edsr`.

Config values can be overridden on the command line, e.g. `--config.batch_size=32`.
A rerun with the same --workdir resumes from its latest checkpoint. The same command is
installed as `srno-train` (see srno_jax/train_cli.py).
"""

from srno_jax.train_cli import main

if __name__ == "__main__":
    main()
