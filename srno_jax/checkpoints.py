"""Checkpoints: the reference's PyTorch ``.pth`` files, mapped onto the Flax parameters.

The mapping between the reference's state-dict names and this package's parameter paths
lives in `torch_name` alone; both directions (import, and exporting gradients or
parameters under torch names) use it.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from srno_jax.errors import CheckpointError, ConfigError
from srno_jax.models import SRNO, init_variables, make_model

# (pattern on the Flax path, torch name template); the first match wins.
_RULES = [
    (r"encoder/head/(\w+)", r"encoder.head.0.\1"),
    (r"encoder/block_(\d+)/conv_0/(\w+)", r"encoder.body.\1.body.0.\2"),
    (r"encoder/block_(\d+)/conv_1/(\w+)", r"encoder.body.\1.body.2.\2"),
    (r"encoder/sfe1/(\w+)", r"encoder.SFENet1.\1"),
    (r"encoder/sfe2/(\w+)", r"encoder.SFENet2.\1"),
    (r"encoder/rdb_(\d+)/conv_(\d+)/(\w+)", r"encoder.RDBs.\1.convs.\2.conv.0.\3"),
    (r"encoder/rdb_(\d+)/lff/(\w+)", r"encoder.RDBs.\1.LFF.\2"),
    (r"encoder/gff_(\d)/(\w+)", r"encoder.GFF.\1.\2"),
    (r"lifting/(\w+)", r"conv00.\1"),
    (r"kernel_integrals_(\d)/k_norm/(\w+)", r"conv\1.kln.\2"),
    (r"kernel_integrals_(\d)/v_norm/(\w+)", r"conv\1.vln.\2"),
    (r"kernel_integrals_(\d)/(\w+)/(\w+)", r"conv\1.\2.\3"),
    (r"projection/(fc\d)/(\w+)", r"\1.\2"),
]
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Keys of the reference that hold no parameter of the forward pass (EDSR's MeanShift).
_UNUSED = re.compile(r"encoder\.(sub_mean|add_mean)\.(weight|bias)$")
# Some releases of the reference RDN number the second GFF layer 2 instead of 1.
_ALIASES = {"encoder.GFF.2.": "encoder.GFF.1."}


def torch_name(path: str, n_resblocks: int | None = None) -> str:
    """The reference state-dict name of a Flax parameter path like 'lifting/kernel'."""
    if path == "encoder/body_conv/kernel" or path == "encoder/body_conv/bias":
        return f"encoder.body.{n_resblocks}.{_LEAF[path.rsplit('/', 1)[1]]}"
    for pattern, template in _RULES:
        m = re.fullmatch(pattern, path)
        if m:
            name = m.expand(template)
            head, leaf = name.rsplit(".", 1)
            return f"{head}.{_LEAF[leaf]}"
    raise KeyError(f"no reference name for parameter {path}")


def to_torch_layout(x: np.ndarray, path: str) -> np.ndarray:
    """A Flax parameter (or its gradient) in the reference's layout.

    Conv kernels (kh, kw, in, out) -> (out, in, kh, kw); Dense kernels (in, out) -> the
    1x1 conv's (out, in, 1, 1); per-head LayerNorm (heads, d) -> (heads, 1, d).
    """
    x = np.asarray(x)
    if path.endswith("kernel"):
        return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T[:, :, None, None]
    if "_norm/" in path:
        return x[:, None, :]
    return x


def from_torch_layout(x: np.ndarray, path: str, ndim: int) -> np.ndarray:
    """Inverse of `to_torch_layout` for a Flax parameter of rank `ndim`."""
    if path.endswith("kernel"):
        return x.transpose(2, 3, 1, 0) if ndim == 4 else x[:, :, 0, 0].T
    if "_norm/" in path:
        return x[:, 0, :]
    return x


def _flat_paths(tree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in keys): v for keys, v in flat}


def _n_resblocks(model: SRNO):
    return getattr(model.encoder, "n_resblocks", None)


def abstract_variables(model: SRNO):
    """Shapes and dtypes of the model's variables, without computing anything."""
    return jax.eval_shape(lambda: init_variables(model))


def params_to_torch(params, model: SRNO) -> dict[str, np.ndarray]:
    """A Flax params tree (parameters or gradients) as a reference state dict of numpy."""
    n = _n_resblocks(model)
    return {torch_name(p, n): to_torch_layout(v, p) for p, v in _flat_paths(params).items()}


def params_from_torch(state_dict: dict[str, np.ndarray], model: SRNO, source: str = "checkpoint"):
    """Maps a reference state dict onto the model's Flax params, checking every key and shape.

    Raises `CheckpointError` naming the first unknown or missing key or wrong shape.
    """
    sd = {}
    for k, v in state_dict.items():
        for old, new in _ALIASES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        sd[k] = v
    target = _flat_paths(abstract_variables(model)["params"])
    n = _n_resblocks(model)
    names = {torch_name(p, n): p for p in target}
    unknown = sorted(k for k in sd if k not in names and not _UNUSED.match(k))
    if unknown:
        raise CheckpointError(
            f"{source}: unknown parameter(s) {unknown[:5]} for this architecture; is the "
            f"checkpoint's model args (encoder, width, blocks) what produced these weights?")
    missing = sorted(k for k in names if k not in sd)
    if missing:
        raise CheckpointError(f"{source}: missing parameter(s) {missing[:5]}; the file is "
                              "incomplete or of another architecture")
    flat = {}
    for name, path in names.items():
        want = target[path].shape
        # The reference's shape for this parameter, from a zero-stride view (no allocation).
        torch_shape = to_torch_layout(np.broadcast_to(np.float32(0), want), path).shape
        value = np.asarray(sd[name])
        if value.shape != torch_shape:
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(value.shape)}, the model expects "
                f"{torch_shape}; the checkpoint's architecture does not match its args")
        got = from_torch_layout(value, path, len(want))
        flat[path] = jnp.asarray(got, jnp.float32)
    return _unflatten(flat)


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def model_from_reference_args(args: dict, source: str = "checkpoint") -> SRNO:
    """The model described by a reference checkpoint's ``model['args']``."""
    try:
        spec = args["encoder_spec"]
        return make_model(spec["name"], spec.get("args"), width=int(args.get("width", 256)),
                          heads=int(args.get("blocks", 16)))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: model args {args!r} lack {e}; not an SRNO checkpoint") from None
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_torch_checkpoint(path: str | os.PathLike):
    """Reads a reference ``.pth`` (no PyTorch needed) -> (model, {'params': ...})."""
    from srno_jax.torch_pickle import read_pth

    ckpt = read_pth(path)
    try:
        spec = ckpt["model"]
        name, args, sd = spec["name"], spec["args"], spec["sd"]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{path}: not a reference SRNO checkpoint (expected {{'model': {{'name', 'args', "
            "'sd'}}}} as the reference's train.py saves)") from None
    if name != "sronet":
        raise CheckpointError(f"{path}: holds a {name!r} model; only 'sronet' (SRNO) is supported")
    model = model_from_reference_args(args, str(path))
    return model, {"params": params_from_torch(sd, model, str(path))}


def load_checkpoint(path: str | os.PathLike):
    """Loads a checkpoint for inference: returns ``(model, variables)``.

    `path` is a reference PyTorch ``.pth`` file (the official releases or a file written
    by the reference's train.py), or one of this package's Orbax checkpoints: a training
    workdir (its latest step is used) or one step's folder.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from srno_jax.train import load_for_inference

        return load_for_inference(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return load_torch_checkpoint(path)
