"""Checkpoints: the reference's PyTorch ``.pth`` files, and this package's Orbax checkpoints.

The mapping between the reference's state-dict names and this package's parameter paths
lives in `torch_name` alone; both directions (import, and exporting gradients or
parameters under torch names) use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from srno_jax import sharding
from srno_jax import workdir as workdir_lib
from srno_jax.config_checks import dotted
from srno_jax.errors import CheckpointError, ConfigError, SRNOError, first_line
from srno_jax.models import (
    SRNO,
    check_variables,
    first_shape_mismatch,
    init_variables,
    make_model,
    shapes_by_path,
    spec_of,
)

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
log = logging.getLogger("srno_jax")
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

    Keys saved from a ``DataParallel`` or ``DistributedDataParallel`` wrapper (every one
    starting ``module.``) are read without that prefix. Raises `CheckpointError` naming
    the first unknown or missing key or wrong shape, or a weight beyond float32's range.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    sd, read_as = {}, {}
    for key, v in state_dict.items():
        k = key
        for old, new in _ALIASES.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        if k in sd:
            raise CheckpointError(
                f"{source}: parameters {read_as[k]} and {key} are both read as {k}; the "
                "file holds a layer this architecture does not have"
            )
        sd[k], read_as[k] = v, key
    target = _flat_paths(abstract_variables(model)["params"])
    n = _n_resblocks(model)
    names = {torch_name(p, n): p for p in target}
    unknown = sorted(k for k in sd if k not in names and not _UNUSED.match(k))
    if unknown:
        raise CheckpointError(
            f"{source}: unknown parameter(s) {unknown[:5]} for this architecture; is the "
            f"checkpoint's model args (encoder, width, blocks) what produced these weights?"
        )
    missing = sorted(k for k in names if k not in sd)
    if missing:
        raise CheckpointError(
            f"{source}: missing parameter(s) {missing[:5]}; the file is "
            "incomplete or of another architecture"
        )
    flat = {}
    for name, path in names.items():
        want = target[path].shape
        # The reference's shape for this parameter, from a zero-stride view (no allocation).
        torch_shape = to_torch_layout(np.broadcast_to(np.float32(0), want), path).shape
        value = np.asarray(sd[name])
        if value.shape != torch_shape:
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(value.shape)}, the model expects "
                f"{torch_shape}; the checkpoint's architecture does not match its args"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(
                f"{source}: parameter {name} is {value.dtype}, not floating point; the file "
                "holds no trained weights there (was it written by a quantising tool?)"
            )
        # float64 beyond float32's range would become infinite, and then be taken for
        # a diverged run.
        if value.dtype.itemsize > 4 and np.isfinite(value).all():
            if (np.abs(value) > np.finfo(np.float32).max).any():
                raise CheckpointError(
                    f"{source}: parameter {name} ({value.dtype}) exceeds float32's range; "
                    "the file holds no trained SRNO weights there"
                )
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
        unknown = set(args) - {"encoder_spec", "width", "blocks"}
        if unknown:
            raise CheckpointError(
                f"{source}: unknown model argument(s) {sorted(unknown)}; SRNO takes "
                "encoder_spec, width and blocks"
            )
        return make_model(
            spec["name"],
            spec.get("args"),
            width=args.get("width", 256),
            heads=args.get("blocks", 16),
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{source}: model args {args!r} lack {e}; not an SRNO checkpoint"
        ) from None
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_torch_checkpoint(path: str | os.PathLike):
    """Reads a reference ``.pth`` (no PyTorch needed) -> (model, {'params': ...}, epoch),
    the epoch the reference's train.py recorded, or None."""
    from srno_jax.torch_pickle import read_pth

    ckpt = read_pth(path)
    try:
        spec = ckpt["model"]
        name, args, sd = spec["name"], spec["args"], spec["sd"]
        if not isinstance(sd, dict):
            raise TypeError
    except (KeyError, TypeError):
        bare = (
            isinstance(ckpt, dict)
            and ckpt
            and all(isinstance(v, np.ndarray) for v in ckpt.values())
        )
        raise CheckpointError(
            f"{path}: not a reference SRNO checkpoint (expected {{'model': {{'name', 'args', "
            "'sd'}} as the reference's train.py saves)"
            + (
                "; it holds a bare state dict (torch.save(model.state_dict())), which does "
                "not record the architecture: save {'model': {'name': 'sronet', 'args': "
                "<the model args of its training config>, 'sd': state_dict}} instead"
                if bare
                else ""
            )
        ) from None
    if name != "sronet":
        raise CheckpointError(f"{path}: holds a {name!r} model; only 'sronet' (SRNO) is supported")
    model = model_from_reference_args(args, str(path))
    epoch = ckpt.get("epoch")
    return (
        model,
        {"params": params_from_torch(sd, model, str(path))},
        epoch if isinstance(epoch, int) else None,
    )


def check_finite(params, source: str) -> None:
    """Raises `CheckpointError` naming the first parameter holding NaN or infinity."""
    for path, v in _flat_paths(params).items():
        if not np.isfinite(np.asarray(v)).all():
            raise CheckpointError(
                f"{source}: parameter {path} holds NaN or infinite values: the run that "
                "wrote it diverged, or its files are corrupt. Use an earlier checkpoint or "
                "another copy"
            )


# --- this package's Orbax checkpoints --------------------------------------------------------
#
# <workdir>/checkpoints/<step>/ holds `params` (the Flax parameters), `train_state` (step,
# Adam's state, the non-finite counter) and `meta` (JSON: model spec, seed, step, config).
# Inference reads `params` and `meta` alone. Older step folders hold `state` (the whole
# train state) instead of the first two; they are read as well.

# The dtypes parameters are exported and loaded in: integer weights would be wrong numbers.
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def model_spec(config) -> dict:
    """The model part of a training config as plain JSON, as checkpoints record it."""
    m = config.model
    return {
        "encoder": m.encoder,
        "encoder_args": dict(m.encoder_args),
        "width": m.width,
        "heads": m.heads,
    }


def model_from_spec(spec: dict, dtype="float32", fused: bool = False, mesh=None) -> SRNO:
    return make_model(
        spec["encoder"],
        spec["encoder_args"],
        width=spec["width"],
        heads=spec["heads"],
        dtype=dtype,
        fused=fused,
        mesh=mesh,
    )


def manager(workdir, keep: int, keep_every: int = 0) -> ocp.CheckpointManager:
    """Asynchronous saves into <workdir>/checkpoints, keeping the last `keep` + 1, every
    step that is a multiple of `keep_every` (0: none), and the steps that the runs which
    saved them kept for good (`_kept_for_good`): a resume with another `keep_every`
    does not delete them.

    One more than asked: the newest checkpoint is the one a divergence can prove bad
    (`delete_after`), and the `keep` before it must still be there then.
    """
    policies = ocp.checkpoint_managers
    folder = workdir_lib.resolve(workdir) / "checkpoints"
    kept = [policies.LatestN(keep + 1), policies.CustomSteps(_kept_for_good(folder))]
    if keep_every:
        kept.append(policies.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(kept), create=True
    )
    return ocp.CheckpointManager(folder, options=options)


def _kept_for_good(folder: epath.Path) -> list[int]:
    """The steps in `folder` that are multiples of the every-so-many steps that the run
    which saved them kept (its ``checkpoint.keep_every_epochs`` times its steps per
    epoch, read from each step's metadata; unreadable steps are left to the restore)."""
    steps = []
    for step in steps_in(folder):
        try:
            meta = _read_meta(folder / str(step))
            every = meta["config"]["checkpoint"].get("keep_every_epochs", 0)
            every *= meta["data"].get("steps_per_epoch") or 0
        except Exception:  # the restore names what is wrong with it
            continue
        if every and step % every == 0:
            steps.append(step)
    return sorted(steps)


def steps_in(folder: epath.Path) -> list[int]:
    """The steps saved in a checkpoints/ `folder` (none if it does not exist), newest
    first: Orbax's names, ASCII digits without leading zeros ('²' and '0010' are not)."""
    if not folder.is_dir():
        return []
    return sorted((int(p.name) for p in folder.iterdir() if _STEP.fullmatch(p.name)), reverse=True)


@contextlib.contextmanager
def managed(workdir, keep: int, keep_every: int = 0):
    """`manager` as a context, closed at its end unless a write failed: closing Orbax's
    broken writer threads then prints their tracebacks, and the run is ending anyway."""
    mngr, failed = manager(workdir, keep, keep_every), False
    try:
        yield mngr
    except CheckpointWriteError:
        failed = True
        raise
    finally:
        if not failed:
            mngr.close()


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, an unwritable bucket, a lost host)."""


def _last_complete(mngr, step: int = -1) -> str:
    """The newest step other than `step` whose folder was written in full (renamed from
    Orbax's temporary name)."""
    folder = epath.Path(mngr.directory)
    done = [s for s in mngr.all_steps() if s != step and (folder / str(s)).is_dir()]
    return f"step {max(done)}" if done else "none yet"


def _free_bytes(mngr) -> int | None:
    """Free bytes on the disk of a local checkpoint folder; None for a bucket."""
    where = os.fspath(mngr.directory)
    if workdir_lib.is_uri(where):
        return None
    import shutil

    return shutil.disk_usage(where).free


def _runtime_error(e: BaseException) -> BaseException | None:
    """The error of JAX's runtime (a collective or a barrier between hosts) behind `e`, if
    any: Orbax re-raises a barrier's timeout as a `TimeoutError`, an `OSError`."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, jax.errors.JaxRuntimeError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_failed(mngr, step: int, e: Exception) -> CheckpointWriteError:
    last = _last_complete(mngr, step)
    runtime = _runtime_error(e)
    if runtime is not None:
        cause = first_line(e) + ("" if runtime is e else f" ({first_line(runtime)})")
        return CheckpointWriteError(
            f"checkpoint {step} could not be saved in {mngr.directory}: the hosts lost each "
            f"other during the save: {cause}. Another host has probably failed: see its log. "
            f"The last complete checkpoint is {last}"
        )
    free = _free_bytes(mngr)
    where = os.fspath(mngr.directory) + ("" if free is None else f" ({free / 2**20:.0f} MB free)")
    return CheckpointWriteError(
        f"a checkpoint write failed in {where}: {first_line(e)}. Is the disk full or the bucket "
        f"unwritable? The last complete checkpoint is {last}"
    )


def _check_room(mngr, state, step: int) -> None:
    """Refuses a save that cannot fit on a local disk, before writing anything: a write
    that fails half-way leaves TensorStore's writer threads printing tracebacks. Each host
    checks its own disk and all of them refuse together, as the save is a collective."""
    free = _free_bytes(mngr)
    need = sum(x.nbytes for x in jax.tree.leaves(state))
    short = free is not None and free < need + 2**20
    # Each host's free MB where it lacks room, else -1.
    free_mb = sharding.host_ints(free // 2**20 if short else -1)
    hosts = np.flatnonzero(free_mb >= 0)
    if hosts.size:
        p = int(hosts[0])
        where = "" if len(free_mb) == 1 else f" on process {p}"
        raise CheckpointWriteError(
            f"the disk of {mngr.directory} is full{where}: {free_mb[p]} MB free, checkpoint "
            f"{step} needs about {need / 2**20:.0f} MB. Free some space and rerun to resume; "
            f"the last complete checkpoint is {_last_complete(mngr, step)}"
        )


def check_same_model(meta: dict, config, where) -> None:
    """Refuses (`CheckpointError`) a step's `meta` of another model than `config`'s,
    naming each field that differs and the flags that match the checkpoint."""
    if meta["model"] != model_spec(config):
        there, here = dotted(meta["model"]), dotted(model_spec(config))
        keys = [k for k in {**there, **here} if there.get(k) != here.get(k)]
        raise CheckpointError(
            f"{where} holds a checkpoint of another model: "
            + ", ".join(f"model.{k} {there.get(k)} there, {here.get(k)} here" for k in keys)
            + "; resume with "
            + " ".join(f"--config.model.{k}={there[k]}" for k in keys if k in there)
            + ", or use another --workdir"
        )


def saved_data_order(meta: dict) -> dict:
    """What fixed the data order of the run that saved a step's `meta` (`save`'s `data`).
    The older layout without "data" tells its seed, and its batch size and repeat in its
    config; its steps per epoch and image count are not known."""
    old = meta.get("config", {})
    return meta.get("data") or {
        "batch_size": old.get("batch_size"),
        "seed": meta.get("seed"),
        "repeat": old.get("data", {}).get("repeat"),
    }


def save(mngr: ocp.CheckpointManager, state, config, data: dict | None = None) -> None:
    """Starts an asynchronous save of a train state at its step (all hosts call it).

    `data`: what fixes the run's data order (JSON values; `train._data_order`), kept in
    the metadata under "data" for a resumed run to compare. Raises `CheckpointError` in
    one line when the storage refuses (a full disk): the error of an earlier asynchronous
    save surfaces here or in `finish`.
    """
    step = int(state.step)
    meta = {
        "model": model_spec(config),
        "seed": config.seed,
        "step": step,
        "config": json.loads(config.to_json_best_effort()),
        "data": data or {},
    }
    rest = {"step": state.step, "opt_state": state.opt_state, "nonfinite": state.nonfinite}
    _check_room(mngr, state, step)
    try:
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train_state=ocp.args.StandardSave(rest),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
    except Exception as e:  # Orbax and TensorStore raise many kinds for a failed write
        raise _write_failed(mngr, step, e) from None


def finish(mngr: ocp.CheckpointManager) -> None:
    """Waits for saves in flight; a failed one raises `CheckpointError` (see `save`)."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _write_failed(mngr, -1, e) from None  # the failed step has no folder


def _read_meta(step_dir: epath.Path) -> dict:
    return json.loads((step_dir / "meta" / "metadata").read_text())


def restore_latest(mngr: ocp.CheckpointManager, target, shardings, check_meta):
    """The newest checkpoint that every host can read, as `target`'s type on `shardings`,
    or None if there is none (all hosts call it).

    `check_meta(meta)` may raise to refuse a checkpoint of another model or batch size.
    A step that cannot be read (truncated, bit rot, a missing item, edited metadata) is
    skipped with a warning naming it, and renamed `<step>.unreadable` once an older one
    has been read, so that training can write that step again. All hosts try the same
    step, the newest that any of them lists (a shared file system's cache can hide a new
    folder from one host's listing for a while; that host waits for it to appear), and
    agree on it before moving on, so a read error on one host moves them all to the same
    older step. `CheckpointError` when none can be read.
    """
    listed, tried = set(mngr.all_steps()), []
    while True:
        step = int(sharding.host_ints(max(listed.difference(tried), default=-1)).max())
        if step < 0:
            break
        tried.append(step)
        step_dir = epath.Path(mngr.directory) / str(step)
        if step not in listed:
            _wait_to_appear(step_dir)
        state, refused = None, None
        try:
            meta = _read_meta(step_dir)
            try:
                _check_step_name(step_dir, meta)
                check_meta(meta)
            except SRNOError as e:
                refused = e
            else:
                state = _restore_state(step_dir, target, shardings)
        except Exception as e:
            _warn_unreadable(step_dir, e)
        votes = sharding.host_ints(_REFUSED if refused else _READ if state is not None else 0)
        if (votes == _REFUSED).any():
            raise refused or CheckpointError(
                f"process {np.argmax(votes == _REFUSED)} refused checkpoint {step_dir}; "
                "its log says why"
            )
        if (votes == 0).any():
            if state is not None:
                log.warning(
                    "checkpoint %s is unreadable on process %d; trying the one before",
                    step_dir,
                    np.argmax(votes == 0),
                )
            continue
        if len(tried) > 1:
            _set_aside(mngr, tried[:-1])
        return state
    if tried:
        raise CheckpointError(
            f"none of the checkpoints {tried} in {mngr.directory} can be read; "
            "move that folder away to start afresh"
        )
    return None


def _wait_to_appear(step_dir: epath.Path, timeout_s: float = 25.0) -> None:
    """Waits up to `timeout_s` for a folder that another host lists: less than the 30 s
    in which CPU hosts must reach the next collective (Gloo's limit)."""
    deadline = time.monotonic() + timeout_s
    while not step_dir.exists() and time.monotonic() < deadline:
        time.sleep(1.0)


# A host's verdict on one step in `restore_latest` (0: it could not read the step).
_READ, _REFUSED = 1, 2


def _warn_unreadable(step_dir, e: Exception) -> None:
    log.warning("checkpoint %s is unreadable (%s); trying the one before", step_dir, first_line(e))


def _restore_state(step_dir: epath.Path, target, shardings):
    if (step_dir / "state").exists():  # the older layout
        return _restore_item(step_dir / "state", target, shardings)
    rest = lambda t: {"step": t.step, "opt_state": t.opt_state, "nonfinite": t.nonfinite}
    params = _restore_item(step_dir / "params", target.params, shardings.params)
    return target.replace(
        params=params, **_restore_item(step_dir / "train_state", rest(target), rest(shardings))
    )


def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
    """Renames unreadable step folders to `<step>.unreadable` (process 0), for all hosts."""
    error = None
    if jax.process_index() == 0:
        try:
            for step in steps:
                d = epath.Path(mngr.directory) / str(step)
                # A step set aside before and written again: keep both.
                name, n = f"{step}.unreadable", 1
                while (d.parent / name).exists():
                    n += 1
                    name = f"{step}.unreadable.{n}"
                d.rename(d.parent / name)
        except OSError as e:
            error = CheckpointError(
                f"cannot rename the unreadable checkpoint {d} ({first_line(e)}); "
                "move it away and rerun"
            )
    # Every host sees the renames before it reloads, and all raise if they failed.
    sharding.raise_together(error, "to set aside an unreadable checkpoint")
    mngr.reload()


def _restore_item(path: epath.Path, target, shardings):
    # The handler, not a Checkpointer: a Checkpointer's restore ends in a barrier of all
    # hosts, which a host whose read failed would never reach.
    handler = ocp.StandardCheckpointHandler()
    with _reading():
        try:
            return handler.restore(
                path, args=ocp.args.StandardRestore(_abstract(target, shardings))
            )
        finally:
            handler.close()


@contextlib.contextmanager
def _reading():
    """Around an Orbax read: what a failed one leaves behind is dropped
    (`_quiet_abandoned_reads`)."""
    _quiet_abandoned_reads()
    _quiet["reads"] += 1  # the first leftovers come while the read fails
    try:
        yield
    except Exception:
        # The reads it abandoned end within this, also while a later read succeeds.
        _quiet["until"] = time.monotonic() + 60
        raise
    finally:
        _quiet["reads"] -= 1


# `_quiet_abandoned_reads`' hook drops while reads are in flight and until "until".
_quiet = {"reads": 0, "until": 0.0}


def _quiet_abandoned_reads() -> None:
    """Drops what a failed Orbax read leaves behind, during a read and for a minute after
    one fails. Its other TensorStore reads end on a closed event loop, and Python reports
    each as an "unraisable" exception (and asyncio logs their tasks as "never
    retrieved"): hundreds of tracebacks around the one line about the unreadable step.
    Any other unraisable exception, and these at any other time, still reach the hook
    that was in place."""
    if getattr(sys.unraisablehook, "quiets_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        orbax = code is not None and "orbax" in code.co_filename
        quiet = _quiet["reads"] > 0 or time.monotonic() < _quiet["until"]
        if not (quiet and (closed or orbax)):
            previous(unraisable)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook
    # The same reads' tasks, collected, are also logged by asyncio as "never retrieved".
    asyncio_log = logging.getLogger("asyncio")
    if _not_abandoned not in asyncio_log.filters:
        asyncio_log.addFilter(_not_abandoned)


def _not_abandoned(record: logging.LogRecord) -> bool:
    quiet = _quiet["reads"] > 0 or time.monotonic() < _quiet["until"]
    # asyncio's "Task ...", "Future ..." or "_GatheringFuture exception was never retrieved".
    return not (quiet and "exception was never retrieved" in str(record.msg))


def delete_after(mngr: ocp.CheckpointManager, step: int) -> int | None:
    """Deletes the checkpoints of steps >= `step`; returns the newest step left, if any."""
    for s in mngr.all_steps():
        if s >= step:
            mngr.delete(s)
    return mngr.latest_step()


_STEP = re.compile(r"0|[1-9][0-9]*")


def _step_dirs(path: epath.Path) -> list[epath.Path]:
    """Step folders for a workdir, its checkpoints/ folder or one step folder, newest first."""
    if (path / "meta").is_dir():
        return [path]
    ckpts = path if path.name == "checkpoints" else path / "checkpoints"
    steps = steps_in(ckpts)
    if not steps:
        pth = sorted(f.name for f in path.glob("*.pth"))
        raise CheckpointError(
            f"no srno-jax checkpoint in {path}: expected a training workdir, "
            "its checkpoints/ folder, or a step folder such as checkpoints/1000"
            + (f"; for the reference's checkpoint give the file, {path / pth[0]}" if pth else "")
        )
    return [ckpts / str(s) for s in steps]


def _load_newest(path) -> tuple[epath.Path, dict, SRNO, dict]:
    """(step folder, its meta, model, {'params': ...}) from one of this package's Orbax
    checkpoints, on one device. Reads only the parameters (in the older layout, the
    parameters part of the stored train state). A newest step that cannot be read gives
    way to the one before with a warning, as in `restore_latest`; a step deleted while
    it was read (by a live run keeping its newest few) makes the folder listed again."""
    root = workdir_lib.resolve(path)
    bad: dict[str, Exception] = {}  # steps that exist and cannot be read
    for _ in range(10):  # each pass lists the folder again, for steps saved meanwhile
        fresh = [d for d in _step_dirs(root) if os.fspath(d) not in bad]
        if not fresh:
            break
        for step_dir in fresh:
            try:
                return (step_dir, *_load_step(step_dir))
            except CheckpointError:
                raise
            except Exception as e:
                if not step_dir.exists():
                    break
                bad[os.fspath(step_dir)] = e
                if step_dir != fresh[-1]:
                    _warn_unreadable(step_dir, e)
    if not bad:
        raise CheckpointError(
            f"the checkpoints in {path} were deleted while they were read, again and "
            "again; give a step folder, or read it when its run saves less often"
        )
    step_dir, e = list(bad.items())[-1]
    raise CheckpointError(
        f"checkpoint {step_dir} cannot be read ({first_line(e)}); its files "
        "are incomplete or damaged: give another step or copy"
    ) from None


def _check_step_name(step_dir: epath.Path, meta: dict) -> None:
    """Refuses a step folder whose name is not the step it holds (a copy or a rename):
    the newest-first order of the folder names would pick the wrong weights."""
    step = meta.get("step")
    if step_dir.name.isdigit() and isinstance(step, int) and step != int(step_dir.name):
        raise CheckpointError(
            f"checkpoint folder {step_dir} holds step {step}; rename it to {step} or move "
            f"it out of {step_dir.parent}"
        )


def _load_step(step_dir: epath.Path) -> tuple[dict, SRNO, dict]:
    """(meta, model, {'params': ...}) of one step folder or export folder."""
    meta = _read_meta(step_dir)
    _check_step_name(step_dir, meta)
    model = model_from_spec(meta["model"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if (step_dir / "state").exists():  # the older layout: the parameters inside the state
        like = {"params": abstract_variables(model)["params"]}
        with _reading(), ocp.PyTreeCheckpointer() as checkpointer:
            params = checkpointer.restore(
                step_dir / "state",
                args=ocp.args.PyTreeRestore(
                    item=like,
                    restore_args=jax.tree.map(
                        lambda _: ocp.ArrayRestoreArgs(sharding=device), like
                    ),
                    partial_restore=True,
                ),
            )["params"]
    else:
        dtype = meta.get("params_dtype", "float32")
        if dtype not in EXPORT_DTYPES:
            raise CheckpointError(
                f"{step_dir}: params_dtype {dtype!r} in its meta is not one of "
                f"{', '.join(EXPORT_DTYPES)}; the meta file was edited or is corrupt"
            )
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract_variables(model)["params"]
        )
        _check_stored_shapes(step_dir, like)
        params = _restore_item(step_dir / "params", like, jax.tree.map(lambda _: device, like))
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    check_finite(params, str(step_dir))
    return meta, model, {"params": params}


def _check_stored_shapes(step_dir: epath.Path, like) -> None:
    """Refuses a step whose stored parameters are not the arrays its meta's model has:
    one line, before Orbax's failed read (which leaves TensorStore reads behind that
    print tracebacks when the process exits)."""
    handler = ocp.StandardCheckpointHandler()
    with _reading():
        try:
            stored = handler.metadata(step_dir / "params").tree
        finally:
            handler.close()
    stored, expected = shapes_by_path(stored), shapes_by_path(like)
    key = first_shape_mismatch(stored, expected)
    if key is not None:
        raise CheckpointError(
            f"{step_dir}: its meta describes a model whose parameter {key} has shape "
            f"{expected.get(key, 'none')}, but the stored one has {stored.get(key, 'none')}"
            ": the meta was edited or belongs to another checkpoint"
        )


def saved_config(path) -> dict:
    """The training config (as JSON data) saved with the newest step of a workdir, its
    checkpoints/ folder or a step folder, the newest whose metadata reads. Raises
    `CheckpointError` where there is none (an export keeps no config)."""
    for step_dir in _step_dirs(workdir_lib.resolve(path)):
        with contextlib.suppress(Exception):
            return _read_meta(step_dir)["config"]
    raise CheckpointError(f"no training config in the checkpoints of {path}")


def export_for_inference(path, out, dtype: str = "float32") -> epath.Path:
    """Writes the parameters of any checkpoint `load_checkpoint` reads (a workdir, its
    newest readable step, a step folder, an export, a reference .pth) as an
    inference-only folder `out` (`save_for_inference`). Returns `out`."""
    model, variables, _, step = _read(path)
    return save_for_inference(model, variables, out, dtype, from_step=step)


def save_for_inference(
    model: SRNO, variables, out, dtype: str = "float32", from_step: int | None = None
) -> epath.Path:
    """Writes `variables` (``{'params': ...}`` of `model`, e.g. after fine-tuning in a
    notebook) as an inference-only folder `out` that `load_checkpoint` reads: the items
    `params`, in `dtype`, one of `EXPORT_DTYPES` (float16 halves the size; loading casts
    back to float32), and `meta` (the model's spec, the dtype, `from_step`). Returns
    `out`. Raises `ConfigError` for a bad dtype or variables that are not `model`'s, and
    `CheckpointError` when `out` exists or a parameter does not fit `dtype`'s range,
    before writing anything."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    check_variables(model, variables)
    out = workdir_lib.resolve(out)
    if out.exists():
        raise CheckpointError(f"{out} exists; choose a new folder for the export")
    if out.parent.name == "checkpoints" and _STEP.fullmatch(out.name):
        raise CheckpointError(  # a training run would take it for its own step
            f"{out} would be read as a step of the training run in {out.parent.parent}; "
            "export somewhere else"
        )
    with np.errstate(over="ignore"):  # an overflow is reported below, in one line
        params = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)), variables["params"])
    for key, x in jax.tree.leaves_with_path(params):
        if not np.isfinite(x).all():
            raise CheckpointError(
                f"params{jax.tree_util.keystr(key)} exceeds {dtype}'s range or is not "
                "finite; export finite parameters, as bfloat16 or float32"
            )
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / "params", params)
    (out / "meta").mkdir()
    (out / "meta" / "metadata").write_text(
        json.dumps({"model": spec_of(model), "params_dtype": dtype, "from_step": from_step})
    )
    return out


def load_checkpoint(path: str | os.PathLike):
    """Loads a checkpoint for inference: returns ``(model, variables)``.

    `path` is a reference PyTorch ``.pth`` file (the official releases or a file written
    by the reference's train.py), or one of this package's Orbax checkpoints: a training
    workdir (its latest readable step is used), its checkpoints/ folder, one step's
    folder, or an `export_for_inference` folder. ``~`` is expanded. Raises
    `CheckpointError` for a missing or unusable file, and for parameters that are not
    all finite. `read_checkpoint` also says which file or step it read.
    """
    model, variables, _ = read_checkpoint(path)
    return model, variables


def read_checkpoint(path: str | os.PathLike) -> tuple[SRNO, dict, str]:
    """`load_checkpoint`'s ``(model, variables)`` and, for a log line, what was read: the
    step folder and its step (``runs/edsr/checkpoints/12000 (step 12000)``), an export
    folder and the step it was exported from, or the ``.pth`` file and the epoch it
    records."""
    return _read(path)[:3]


def _read(path) -> tuple[SRNO, dict, str, int | None]:
    """`read_checkpoint`'s triple and the training step the parameters come from (None
    for a .pth)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(
            f"checkpoint path {path!r} is not a path: give a .pth file or a checkpoint folder"
        )
    p = workdir_lib.resolve(path)
    if p.is_dir():
        step_dir, meta, model, variables = _load_newest(p)
        step, exported = meta.get("step"), meta.get("from_step")
        if isinstance(step, int):
            return model, variables, f"{step_dir} (step {step})", step
        if isinstance(exported, int):
            return model, variables, f"{step_dir} (exported from step {exported})", exported
        return model, variables, str(step_dir), None
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    model, variables, epoch = load_torch_checkpoint(os.fspath(p))
    check_finite(variables["params"], os.fspath(p))
    return model, variables, f"{p}" + ("" if epoch is None else f" (epoch {epoch})"), None
