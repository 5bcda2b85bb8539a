"""Flax modules of SRNO and its encoders, and a factory from the reference's specs."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from srno_jax.errors import ConfigError
from srno_jax.models.encoders import EDSR, RDN, RDN_CONFIGS
from srno_jax.models.srno import SRNO, GalerkinAttention, Projection, check_queries, lifting_inputs

# The reference's constructor defaults; a checkpoint's args list only what differs.
ENCODER_DEFAULTS = {
    "edsr-baseline": dict(n_resblocks=16, n_feats=64, res_scale=1.0),
    "edsr": dict(n_resblocks=32, n_feats=256, res_scale=0.1),
    "rdn": dict(G0=64, RDNkSize=3, RDNconfig="B"),
}


# Ranges for model sizes. A checkpoint from elsewhere names them: the bounds (far above
# the paper's models) keep a hostile or corrupt one from building a model whose tracing
# would run for hours.
_SIZES = {"n_resblocks": 256, "n_feats": 1024, "G0": 1024, "width": 4096, "heads": 4096}


def _size(name: str, value) -> int:
    """`value` as an int if it is a whole number in [1, _SIZES[name]], else ConfigError."""
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    )
    if isinstance(value, bool) or not whole or not 1 <= value <= _SIZES[name]:
        raise ConfigError(
            f"model argument {name} = {value!r} is invalid: it must be a whole number "
            f"in [1, {_SIZES[name]}]"
        )
    return int(value)


def make_encoder(name: str, args: dict | None = None, dtype="float32"):
    """Builds an encoder from the reference's `encoder_spec` name and args, each checked."""
    if not isinstance(name, str) or name not in ENCODER_DEFAULTS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(ENCODER_DEFAULTS)}")
    # A dict, or a ConfigDict (which has items() but is no Mapping).
    if args is not None and not callable(getattr(args, "items", None)):
        raise ConfigError(f"encoder args {args!r} are not a mapping of names to values")
    # The reference's constructors also take these, which change only the upsampling
    # tail (SRNO builds none) and a mean shift its forward pass never applies.
    ignored = {"no_upsampling", "scale"} | ({"rgb_range"} if name != "rdn" else set())
    if args is not None and "no_upsampling" in args and args["no_upsampling"] is not True:
        raise ConfigError(
            f"encoder argument no_upsampling = {args['no_upsampling']!r}: SRNO's encoder "
            "has no upsampling tail, so it must be True (or left out)"
        )
    args = {k: v for k, v in (args or {}).items() if k not in ignored}
    unknown = set(args) - set(ENCODER_DEFAULTS[name])
    if unknown:
        raise ConfigError(
            f"unknown argument(s) {sorted(unknown)} for encoder {name!r}; "
            f"known: {sorted(ENCODER_DEFAULTS[name])}"
        )
    a = {**ENCODER_DEFAULTS[name], **args}
    if name == "rdn":
        if not isinstance(a["RDNconfig"], str) or a["RDNconfig"] not in RDN_CONFIGS:
            raise ConfigError(f"RDNconfig {a['RDNconfig']!r} is not one of {sorted(RDN_CONFIGS)}")
        if a["RDNkSize"] not in (1, 3, 5, 7) or isinstance(a["RDNkSize"], bool):
            raise ConfigError(f"RDNkSize {a['RDNkSize']!r} is invalid: it must be 1, 3, 5 or 7")
        g0 = _size("G0", a["G0"])
        return RDN(g0=g0, config=a["RDNconfig"], kernel_size=int(a["RDNkSize"]), dtype=dtype)
    res_scale = a["res_scale"]
    if isinstance(res_scale, bool) or not isinstance(res_scale, numbers.Real):
        res_scale = math.nan
    if not (math.isfinite(res_scale) and res_scale > 0):
        raise ConfigError(
            f"model argument res_scale = {a['res_scale']!r} is invalid: it must be a "
            "finite number > 0"
        )
    return EDSR(
        n_resblocks=_size("n_resblocks", a["n_resblocks"]),
        n_feats=_size("n_feats", a["n_feats"]),
        res_scale=float(res_scale),
        dtype=dtype,
    )


def init_variables(model: SRNO, seed: int = 0) -> dict:
    """Freshly initialised ``{'params': ...}`` (the shapes do not depend on input sizes)."""
    dummy = (jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 2)))
    return model.init(jax.random.key(seed), *dummy)


def shapes_by_path(params) -> dict[str, tuple[int, ...]]:
    """``{keystr path: shape}`` of a parameter tree (arrays or `jax.ShapeDtypeStruct`)."""
    return {
        jax.tree_util.keystr(k): tuple(v.shape) if hasattr(v, "shape") else np.shape(v)
        for k, v in jax.tree.leaves_with_path(params)
    }


def first_shape_mismatch(got: dict, want: dict) -> str | None:
    """The first path (sorted) that `shapes_by_path` trees `got` and `want` do not share
    with one shape, or None."""
    return next((p for p in sorted(got.keys() | want.keys()) if got.get(p) != want.get(p)), None)


def spec_of(model: SRNO) -> dict:
    """The `make_model` arguments that build `model` again, as checkpoints record them:
    {'encoder', 'encoder_args', 'width', 'heads'} (an EDSR as 'edsr-baseline' with all
    three of its sizes)."""
    enc = model.encoder
    if isinstance(enc, RDN):
        name, args = "rdn", {"G0": enc.g0, "RDNkSize": enc.kernel_size, "RDNconfig": enc.config}
    else:
        name = "edsr-baseline"
        args = {"n_resblocks": enc.n_resblocks, "n_feats": enc.n_feats, "res_scale": enc.res_scale}
    return {"encoder": name, "encoder_args": args, "width": model.width, "heads": model.heads}


@functools.lru_cache(maxsize=8)
def _param_shapes(model: SRNO) -> dict[str, tuple[int, ...]]:
    return shapes_by_path(jax.eval_shape(lambda: init_variables(model))["params"])


def check_variables(model, variables) -> None:
    """Raises `ConfigError` unless `model` is an SRNO and `variables` are its
    ``{'params': ...}``: the same parameter paths and shapes, each floating point. Flax
    would apply a smaller model to a larger model's parameters without a word."""
    fix = "pass the (model, variables) pair that load_checkpoint or make_model gave"
    if not isinstance(model, SRNO):
        raise ConfigError(f"model is a {type(model).__name__}, not an SRNO; {fix}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        whole = isinstance(variables, Mapping) and "encoder" in variables
        raise ConfigError(
            "variables must be {'params': ...}"
            + (": pass the whole variables, not variables['params']" if whole else f"; {fix}")
        )
    want, got = _param_shapes(model), shapes_by_path(variables["params"])
    path = first_shape_mismatch(got, want)
    if path is not None:
        problem = (
            "is missing"
            if path not in got
            else "is not the model's"
            if path not in want
            else f"has shape {got[path]}, the model's {want[path]}"
        )
        raise ConfigError(f"the variables do not fit the model: params{path} {problem}; {fix}")
    for key, v in jax.tree.leaves_with_path(variables["params"]):
        dtype = v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ConfigError(
                f"params{jax.tree_util.keystr(key)} is {dtype}, not floating point: "
                f"integer weights are other numbers; {fix}"
            )


def make_model(
    encoder: str = "edsr-baseline",
    encoder_args: dict | None = None,
    width: int = 256,
    heads: int = 16,
    dtype="float32",
    fused: bool = False,
    mesh=None,
) -> SRNO:
    """SRNO from the reference's model args (`blocks` there is `heads` here), each
    checked: `ConfigError` names the first one out of range. `fused`, `mesh`: SRNO's."""
    width, heads = _size("width", width), _size("heads", heads)
    try:
        floating = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ConfigError(f"dtype {dtype!r} is not a floating-point type such as 'bfloat16'")
    if width % heads:
        raise ConfigError(f"width {width} must be divisible by heads {heads}")
    return SRNO(
        make_encoder(encoder, encoder_args, dtype),
        width=width,
        heads=heads,
        dtype=dtype,
        fused=fused,
        mesh=mesh,
    )


__all__ = [
    "EDSR",
    "RDN",
    "SRNO",
    "GalerkinAttention",
    "Projection",
    "lifting_inputs",
    "make_encoder",
    "make_model",
    "init_variables",
    "check_variables",
    "check_queries",
    "spec_of",
    "ENCODER_DEFAULTS",
]
