"""One small writer for training's progress: log lines and TensorBoard summaries.

Only process 0 writes; on the other hosts every call does nothing. TensorBoard files go
to `<workdir>/tensorboard` through tensorboardX (in the `[train]` extra); without it the
log lines still come and one warning says so. Paths with a scheme (``gs://``) are
written through `etils.epath`.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from srno_jax import workdir as workdir_lib

log = logging.getLogger("srno_jax")


class _EpathFiles:
    """tensorboardX's writer factory for a URI scheme, backed by `etils.epath`."""

    def open(self, path):
        from etils import epath

        return _Stream(epath.Path(path).open("wb"))

    def directory_check(self, path):
        from etils import epath

        epath.Path(path).mkdir(parents=True, exist_ok=True)


class _Stream:
    """A remote file without `fileno`, which tensorboardX would try to fsync."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        return self._f.write(data)

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


class MetricWriter:
    """Progress lines on stderr and TensorBoard scalars and images, from process 0.

    A run started at step `start` has TensorBoard hide what earlier runs logged after it
    (``purge_step``): a run that crashed logged steps its rerun logs again, from its last
    checkpoint or from step 0.
    """

    def __init__(self, workdir, start: int = 0):
        self._tb = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter, record_writer
        except ImportError:
            log.warning(
                "tensorboardX is not installed: no TensorBoard summaries "
                "(pip install 'srno-jax[train]')"
            )
            return
        logdir = workdir_lib.resolve(workdir) / "tensorboard"
        if workdir_lib.is_uri(logdir):
            record_writer.register_writer_factory(str(logdir).split(":")[0], _EpathFiles())
        self._tb = SummaryWriter(str(logdir), purge_step=start + 1)

    def log(self, msg: str, *args) -> None:
        if jax.process_index() == 0:
            log.info(msg, *args)

    def scalars(self, step: int, prefix: str, **values) -> None:
        if self._tb:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image."""
        if self._tb:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb:
            self._tb.close()
