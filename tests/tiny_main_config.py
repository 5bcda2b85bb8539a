"""A `main.py --config` file for subprocess tests: `--config tests/tiny_main_config.py:IMAGE_DIR`.

The tiny model of `test_train.tiny_config`; override with e.g. `--config.total_steps=8`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train import tiny_config  # noqa: E402


def get_config(image_dir):
    return tiny_config(image_dir)
