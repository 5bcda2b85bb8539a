"""Runs training in a fresh process (device count set by XLA_FLAGS).

python tests/train_worker.py IMAGE_DIR WORKDIR OUT.npz STEPS
    trains a few steps and saves the parameters to OUT.npz.
python tests/train_worker.py --fault=NAME MAIN_ARGS...
    main.py with the fault NAME (see FAULTS) on one host of a multi-host run.
"""

import sys
from concurrent.futures.process import BrokenProcessPool

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


def _fail_on(process, cls, name, error, calls=range(sys.maxsize)):
    """Makes `cls.name` raise `error` on `process` at its calls numbered in `calls`."""
    original, count = getattr(cls, name), [0]

    def fails(*args, **kwargs):
        count[0] += 1
        if jax.process_index() == process and count[0] - 1 in calls:
            raise error
        return original(*args, **kwargs)

    setattr(cls, name, fails)


def _unreadable_validation():
    import input_pipeline
    from srno_jax.errors import DataError

    _fail_on(
        0, input_pipeline.FolderSource, "__getitem__", DataError("image bad.png is unreadable")
    )


def _unlockable_workdir():
    from srno_jax import workdir

    _fail_on(0, workdir.WorkdirLock, "acquire", PermissionError(13, "Permission denied"))


def _unreadable_checkpoint():
    import orbax.checkpoint as ocp

    error = OSError(5, "Input/output error")
    _fail_on(1, ocp.StandardCheckpointHandler, "restore", error, calls=range(1))


def _dead_loader():
    import input_pipeline

    error = BrokenProcessPool("a worker died")
    _fail_on(1, input_pipeline.TrainLoader, "__next__", error, calls=range(2, sys.maxsize))


def _lost_peer():
    import jax

    from srno_jax import train

    error = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() "
        "timed out with key: cpu:gloo/0,1/2 and duration: 30s"
    )
    _fail_on(0, train, "train_and_evaluate", error)


def _stale_listing():
    """Process 0's first listing of the checkpoints lacks the newest (a shared file
    system's cached directory)."""
    import orbax.checkpoint as ocp

    original, calls = ocp.CheckpointManager.all_steps, []

    def stale(self, *args, **kwargs):
        steps = list(original(self, *args, **kwargs))
        calls.append(1)
        if jax.process_index() == 0 and len(calls) == 1 and steps:
            steps.remove(max(steps))
        return steps

    ocp.CheckpointManager.all_steps = stale


def _init_from_on_one_host():
    from srno_jax.errors import ConfigError

    _fail_on(1, train, "check_init_from", ConfigError("init_from: no such file or folder"))


FAULTS = {
    "unreadable-validation": _unreadable_validation,  # process 0 reads a bad image
    "unlockable-workdir": _unlockable_workdir,  # process 0 cannot create the lock file
    "unreadable-checkpoint": _unreadable_checkpoint,  # process 1 fails to read one once
    "dead-loader": _dead_loader,  # process 1's loader workers die at step 3
    "lost-peer": _lost_peer,  # a collective of process 0 times out (a host 30 s late)
    "stale-listing": _stale_listing,  # process 0 lists one checkpoint fewer at first
    "init-from-on-one-host": _init_from_on_one_host,  # process 1 lacks init_from's file
}


if __name__ == "__main__":
    if sys.argv[1].startswith("--fault="):
        FAULTS[sys.argv[1].split("=", 1)[1]]()
        train_cli.main([sys.argv[0], *sys.argv[2:]])
    else:
        main(*sys.argv[1:])
