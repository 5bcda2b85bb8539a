"""``srno-train`` (and the repository's ``main.py``): trains SRNO, resuming from its workdir.

    srno-train --config demo --workdir runs/demo
    python main.py --config configs/default.py --workdir runs/edsr --config.batch_size=32

--config is a config file (``path.py``, or ``path.py:arg``) or the name of a built-in
one (default, demo, rdn); fields are overridden with ``--config.FIELD=VALUE``. A rerun
with the same --workdir resumes from its latest checkpoint.
"""

# This module wires the input pipeline to `train.train_and_evaluate`: the one module of
# srno_jax that imports `input_pipeline`, which itself depends on srno_jax.

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import logging
import os
import re
import signal
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from srno_jax.errors import ConfigError, SRNOError, summary

BUILTIN_CONFIGS = ("default", "demo", "rdn")

flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints and TensorBoard logs go (a local folder or a bucket such as "
    "gs://b/run); a rerun with the same workdir resumes from it.",
    required=True,
)
config_flags.DEFINE_config_file(
    "config",
    "default",
    f"A config file (path.py or path.py:arg), or the name of a built-in config: "
    f"{', '.join(BUILTIN_CONFIGS)}. Override its fields with --config.FIELD=VALUE.",
    lock_config=True,
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0 "
    "(found by itself on SLURM, Open MPI, Cloud TPU and Kubernetes).",
)
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_integer(
    "join_timeout_s", 300, "Multi-host: how long to wait for every process to join the run."
)
FLAGS = flags.FLAGS


def builtin_config_path(name: str) -> str | None:
    """The file of built-in config `name` (its ``:arg`` kept), or None if not built in."""
    base, sep, arg = name.partition(":")
    spec = importlib.util.find_spec("configs") if base in BUILTIN_CONFIGS else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], base + ".py") + sep + arg


def _resolve_config_names(argv: list[str]) -> tuple[list[str], str]:
    """Rewrites ``--config NAME`` / ``--config=NAME`` of a built-in config to its file,
    and adds ``--config=<default>`` when none is given. Returns the new argv and the
    config it names (the last --config, which absl takes)."""
    out, value = list(argv), None
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = value = builtin_config_path(out[i + 1]) or out[i + 1]
        elif a.startswith("--config="):
            given = a.split("=", 1)[1]
            value = builtin_config_path(given) or given
            out[i] = f"--config={value}"
    if value is None:
        value = builtin_config_path("default")
        out.insert(1, f"--config={value}")
    return out, value


def _check_config_file(config: str) -> None:
    """Loads ``FILE[:ARG]`` and calls its get_config as ml_collections will, and exits
    with one line when that fails (the file does not load, has no get_config, takes no ARG
    where one is given or the reverse, raises, or returns no ConfigDict): absl would print
    these as a flag-parsing error with a traceback inside."""
    path, sep, arg = config.partition(":")
    # Any file name, as ml_collections loads it (a spec from the name alone needs .py).
    loader = importlib.machinery.SourceFileLoader("_srno_config_check", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:
        loader.exec_module(module)
    except Exception as e:
        sys.exit(f"error: cannot load --config {path}: {summary(e)}")
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        sys.exit(
            f"error: --config {path} has no get_config(); a config file defines one that "
            "returns an ml_collections.ConfigDict (see configs/rdn.py)"
        )
    args = [arg] if sep else []
    try:
        inspect.signature(get_config).bind(*args)
    except TypeError:
        sys.exit(
            f"error: --config {config}: get_config{inspect.signature(get_config)} "
            + (f"takes no argument, but ':{arg}' gives one" if sep else "needs one: FILE:ARG")
        )
    try:
        made = get_config(*args)
    except Exception as e:
        sys.exit(f"error: --config {config}: get_config failed: {summary(e)}")
    if not isinstance(made, ml_collections.ConfigDict):
        sys.exit(
            f"error: --config {config}: get_config returned a {type(made).__name__}, not an "
            "ml_collections.ConfigDict; start from a built-in config (see configs/rdn.py)"
        )


def parse_flags(argv: list[str]):
    """absl's parsing; a bad flag, a config file that is missing or does not load, or
    an unknown --config field gets one line naming it."""
    argv, config = _resolve_config_names(argv)
    path = config.partition(":")[0]
    if path and not os.path.isfile(path):
        sys.exit(
            f"error: --config {path} is neither a config file nor a built-in config "
            f"({', '.join(BUILTIN_CONFIGS)})"
        )
    _check_config_file(config)
    # absl's --help lists the main module's flags: main.py and the srno-train script
    # define none, so name this module's there.
    for flag in FLAGS.get_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    try:
        return FLAGS(argv)
    except flags.Error as e:  # absl's own report is two lines, the message indented
        sys.exit(f"error: {' '.join(str(e).split())} (--helpfull lists the flags)")
    except (KeyError, AttributeError) as e:  # raised by ml_collections for a misspelt key
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(..))
            e = e.args[0]
        msg = (e.args[0] if e.args and isinstance(e.args[0], str) else str(e)).replace("\n", " ")
        keys = set(re.findall(r"""["']([A-Za-z_]\w*)["']""", msg))
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        bad = [g for g in given if keys & set(g[len("--config.") :].split("."))] or given
        sys.exit(
            f"error: unknown config field {msg} (in {', '.join(bad)}); "
            "see the config file for the valid fields"
        )


def training_data(config):
    """The `train.TrainData` of a config: its source, loader and validation images."""
    import jax

    import input_pipeline
    from srno_jax import evaluation
    from srno_jax.errors import ConfigError, DataError
    from srno_jax.train import TrainData

    d = config.data
    sample_q = input_pipeline.check_sampler_settings(
        d.inp_size, d.scale_min, d.scale_max, d.sample_q or None
    )
    source = input_pipeline.make_source(d.train, "train", d.get("data_dir") or None)
    if isinstance(source, input_pipeline.PairedSource):  # before the model is built
        source.check_inp_size(d.inp_size)
    if jax.process_index() == 0:
        logging.getLogger("srno_jax").info("training data: %s", input_pipeline.describe(source))
    val = []
    if d.val:  # checked on every host, read by process 0 alone, which validates
        val_src = input_pipeline.make_source(d.val, "validation", d.get("data_dir") or None)
        if isinstance(val_src, input_pipeline.PairedSource):
            raise ConfigError(
                f"data.val {d.val} is a paired folder; point it at its HR/ "
                f"subfolder, or evaluate the pairs with eval.py --data {d.val}"
            )
        if jax.process_index() == 0:
            val = [val_src[i] for i in range(min(len(val_src), config.eval.max_images))]
            if getattr(val_src, "skipped", 0):  # a fixed set: no image left out or doubled
                raise ConfigError(
                    f"data.val {d.val}: {val_src.skipped} unreadable image(s), the first "
                    f"{val_src.first_failure}; remove them from the folder"
                )
            try:  # at the start, not at the first validation after hours of training
                evaluation.check_validation_images(val, config.eval.scales, config.eval.protocol)
            except DataError as e:
                raise ConfigError(
                    f"data.val {d.val}: {e}; remove it from the folder or change "
                    "--config.eval.scales"
                ) from None

    def batches(start_step: int):
        return input_pipeline.TrainLoader(
            source,
            global_batch=config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            inp_size=d.inp_size,
            scale_min=d.scale_min,
            scale_max=d.scale_max,
            augment=d.augment,
            sample_q=sample_q,
            repeat=d.repeat,
            workers=d.workers or None,
            prefetch=d.prefetch,
            processes=d.worker_processes,
        )

    spe = input_pipeline.steps_per_epoch(len(source), d.repeat, config.batch_size)
    return TrainData(batches, spe, val, len(source))


def run(config, workdir) -> dict:
    """Checks `config`, then trains it in `workdir` (see `train.train_and_evaluate`)."""
    from srno_jax import sharding, train
    from srno_jax.config_checks import check_config

    if not os.fspath(workdir).strip():  # a run would write into the current folder
        raise ConfigError("--workdir is empty (an unset shell variable?); name the run's folder")
    check_config(config)
    sharding.check_even_devices()  # before any collective, which would fail on it
    sharding.check_same_config(config)
    error = None
    try:  # a path that one host lacks must not leave the others waiting
        train.check_init_from(config, workdir)
    except SRNOError as e:
        error = e
    sharding.raise_together(error, f"to find init_from {config.get('init_from')}")
    data, error = None, None
    try:
        data = training_data(config)
    except Exception as e:  # agreed first: the other hosts would wait for this one
        error = e
    sharding.raise_together(error, "to read the training data")
    # Each host samples from its own copy: copies of different sizes would give the hosts
    # different data orders, whose shares overlap and miss samples without any error.
    sharding.check_same(data.images, "training images", "give every host the same data")
    return train.train_and_evaluate(config, workdir, data)


def _main(argv):
    del argv
    import jax

    from srno_jax import compiler, evaluation, sharding, train
    from srno_jax.checkpoints import CheckpointWriteError
    from srno_jax.config_checks import check_config
    from srno_jax.errors import first_line

    train.setup_logging()
    # Outside training's own handlers (train.StopVote), a SIGTERM or Ctrl-C ends the run at
    # once: nothing was computed since its last checkpoint. Within them, a second one does.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_at_once)
    compiler.retain_freed_memory()  # before XLA starts its threads
    try:
        # Before joining a cluster: a typo, or one host's unusable cache folder, costs no
        # one's time, and the other hosts do not wait for a host that has left.
        check_config(FLAGS.config)
        compiler.enable_compilation_cache()
        how = sharding.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.join_timeout_s
        )
        train.log.info("distributed: %s", how)
        results = run(FLAGS.config, FLAGS.workdir)
    except CheckpointWriteError as e:
        # Orbax's writer threads, broken by the failure, would print tracebacks at exit.
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    except SRNOError as e:
        sys.exit(f"error: {e}")
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            # A collective that failed between hosts; exiting normally would wait minutes
            # in JAX's shutdown for hosts that are gone.
            late = " (on CPU, hosts reach each new collective within 30 s of each other)"
            print(
                f"error: process {jax.process_index()}: {first_line(e)}"
                f"{late if 'Gloo' in str(e) else ''}; if another host failed, its log names "
                "the error; rerun to resume from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
        sys.exit(
            f"error: out of memory on {jax.devices()[0].device_kind} ({first_line(e)}); "
            f"lower --config.batch_size (now {FLAGS.config.batch_size}) or "
            "--config.data.inp_size, or use more devices; checkpoints already saved are kept"
        )
    if results:
        print(evaluation.format_results(results))


def _stop_at_once(signum, frame):
    print(
        f"error: {signal.Signals(signum).name} outside training (before it began, after "
        "its last save, or a second signal during it): stopped at once without saving; the "
        "workdir keeps its last checkpoint: rerun to resume",
        file=sys.stderr,
        flush=True,
    )
    # At once: nothing is left to save, and a normal exit would wait in JAX's shutdown
    # barrier for the other hosts, up to its 100 s heartbeat timeout and a fatal error
    # when one of them is blocked in a collective this host has left.
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    main_module = sys.modules["__main__"]
    if not main_module.__doc__:  # the srno-train script: absl's --help prints this docstring
        main_module.__doc__ = __doc__
    try:
        app.run(_main, argv=argv, flags_parser=parse_flags)
    except KeyboardInterrupt:  # before _main's handlers: while parsing the flags
        print("error: interrupted while starting; nothing was done", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
