"""The training config checked once, before any work: every field training reads is
there, and every numeric field is in its range."""

from __future__ import annotations

import math
import numbers

import numpy as np

from srno_jax import metrics
from srno_jax.errors import ConfigError


def _int(lo, hi=None):
    def ok(v):
        return (
            isinstance(v, numbers.Integral)
            and not isinstance(v, bool)
            and v >= lo
            and (hi is None or v <= hi)
        )

    return ok, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")


def _real(lo, hi=None, lo_open=False, hi_open=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

    high = "" if hi is None else f" and {'<' if hi_open else '<='} {hi}"
    return ok, f"a finite number {'>' if lo_open else '>='} {lo}{high}"


F32_MAX = float(np.finfo(np.float32).max)
# field -> (predicate, what it must be).
RULES = {
    "seed": _int(0, 2**32 - 1),  # jax.random.key keeps 32 bits: larger seeds alias smaller
    "batch_size": _int(1),
    "model.width": _int(1),
    "model.heads": _int(1),
    "data.repeat": _int(1),
    "data.inp_size": _int(1),
    "data.scale_min": _real(1),
    "data.scale_max": _real(1),
    "data.sample_q": _int(0),
    "data.workers": _int(0),
    "data.prefetch": _int(0),
    "optim.lr": _real(0, F32_MAX, lo_open=True),  # beyond, the step's float32 rate is inf
    "optim.warmup_mult": _real(0, lo_open=True),
    "optim.warmup_epochs": _int(0),
    "optim.epochs": _int(1),
    "optim.b1": _real(0, 1, hi_open=True),
    "optim.b2": _real(0, 1, hi_open=True),
    "optim.eps": _real(0, lo_open=True),
    "steps_per_epoch": _int(0),
    "total_steps": _int(0),
    "max_train_minutes": _real(0),
    "max_nonfinite_steps": _int(1),
    "log_every_steps": _int(1),
    "checkpoint.every_steps": _int(1),
    "checkpoint.keep": _int(1),
    "checkpoint.keep_every_epochs": _int(0),
    "eval.every_steps": _int(1),
    "eval.max_images": _int(1),
}
COMPUTE_DTYPES = ("float32", "bfloat16")
# What training reads besides RULES' fields (data.data_dir is optional).
REQUIRED = (
    *RULES,
    "compute_dtype",
    "fused_kernels",
    "model.encoder",
    "model.encoder_args",
    "data.train",
    "data.val",
    "data.augment",
    "data.worker_processes",
    "eval.scales",
    "eval.protocol",
)


def dotted(tree: dict, prefix: str = "") -> dict:
    """A nested dict (a config's ``to_dict()``, a checkpoint's model spec) as
    {'optim.lr': 0.001, 'model.encoder_args.n_feats': 64}: its leaves by dotted name."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(dotted(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _get(config, field):
    node = config
    for key in field.split("."):
        if key not in node:
            return None, False
        node = node[key]
    return node, True


def _absent(config, field) -> str | None:
    """The first part of `field` the config lacks ('data' for 'data.inp_size' when the
    whole section is missing), or None."""
    keys = field.split(".")
    for i in range(1, len(keys) + 1):
        if not _get(config, ".".join(keys[:i]))[1]:
            return ".".join(keys[:i])
    return None


def check_config(config) -> None:
    """Raises `ConfigError` naming the first field missing or outside its range, and the
    fix."""
    missing = dict.fromkeys(a for f in REQUIRED if (a := _absent(config, f)))
    if missing:
        raise ConfigError(
            f"the config has no field {', '.join(missing)}: a config file starts from a "
            "built-in one and changes what it needs (see configs/rdn.py)"
        )
    for field, (ok, what) in RULES.items():
        value = _get(config, field)[0]
        if not ok(value):
            raise ConfigError(
                f"config field {field} = {value!r} is invalid: it must be {what} "
                f"(set it with --config.{field}=...)"
            )
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"config field compute_dtype = {config.compute_dtype!r} is invalid: it must be one "
            f"of {', '.join(COMPUTE_DTYPES)}"
        )
    # The model is checked as a checkpoint's model args are.
    from srno_jax.models import make_model

    model = config.model
    try:
        make_model(model.encoder, model.encoder_args, model.width, model.heads)
    except ConfigError as e:
        raise ConfigError(
            f"config field model: {e} (set it with --config.model.<field>=..., an "
            "encoder argument with --config.model.encoder_args.<name>=...)"
        ) from None
    # The evaluation settings are checked as evaluation itself checks them.
    for s in config.eval.scales:
        _named("eval.scales", metrics.check_scale, s)
    _named("eval.protocol", metrics.check_protocol, config.eval.protocol)


def _named(field, check, value):
    try:
        check(value)
    except ConfigError as e:
        raise ConfigError(f"config field {field}: {e}") from None
