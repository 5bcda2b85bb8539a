"""Training: the state, the jitted data-parallel step, Orbax checkpoints and the loop.

One code path for every scale of hardware: the batch is sharded over a ('data',) mesh of
all devices of all hosts, parameters are replicated, and `jax.jit` inserts the gradient
all-reduce. Host p builds only its share of each global batch.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

import input_pipeline
from srno_jax import compiler, evaluation, sharding
from srno_jax.errors import CheckpointError, SRNOError
from srno_jax.models import SRNO, init_variables, make_model
from srno_jax.schedules import lr_at_epoch

log = logging.getLogger("srno_jax")


class TrainingDiverged(SRNOError):
    """Too many non-finite steps in a row."""


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs; the data position is `step` (one batch a step)."""
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array  # consecutive steps skipped for a non-finite loss or gradient


def model_spec(config) -> dict:
    """The model part of a config as plain JSON, as checkpoints record it."""
    m = config.model
    return {"encoder": m.encoder, "encoder_args": dict(m.encoder_args), "width": m.width,
            "heads": m.heads}


def model_from_spec(spec: dict, dtype="float32") -> SRNO:
    return make_model(spec["encoder"], spec["encoder_args"], width=spec["width"],
                      heads=spec["heads"], dtype=dtype)


def model_from_config(config) -> SRNO:
    return model_from_spec(model_spec(config), config.get("compute_dtype", "float32"))


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam's moment estimates only; the epoch's learning rate is applied in the step.

    Taking the rate from the state's step (not the optimizer's own count) keeps the
    schedule on the data's epochs even when a non-finite step is skipped.
    """
    o = config.optim
    return optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)


def learning_rate(step, config, steps_per_epoch: int):
    o = config.optim
    return lr_at_epoch(step // steps_per_epoch + 1, base_lr=o.lr, warmup_mult=o.warmup_mult,
                       warmup_epochs=o.warmup_epochs, total_epochs=o.epochs)


def init_state(model: SRNO, tx, seed: int) -> TrainState:
    params = init_variables(model, seed)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite=jnp.zeros((), jnp.int32))


def l1_loss(params, model: SRNO, batch) -> jax.Array:
    pred = model.apply({"params": params}, batch["inp"], batch["coord"], batch["cell"])
    return jnp.mean(jnp.abs(pred - batch["gt"]))


def train_step(state: TrainState, batch, *, model: SRNO, tx, config, steps_per_epoch: int):
    """One step of L1 + Adam; a non-finite loss or gradient leaves the parameters as they were."""
    loss, grads = jax.value_and_grad(l1_loss)(state.params, model, batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = learning_rate(state.step, config, steps_per_epoch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new = state.replace(step=state.step + 1, params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
    return new, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": finite}


def state_shardings(state, mesh):
    return jax.tree.map(lambda _: sharding.replicated(mesh), state)


def compile_step(model, tx, config, steps_per_epoch, mesh, state):
    """The jitted step: batch sharded over 'data', state replicated and donated."""
    fn = lambda s, b: train_step(s, b, model=model, tx=tx, config=config,
                                 steps_per_epoch=steps_per_epoch)
    ss = state_shardings(state, mesh)
    return jax.jit(fn, in_shardings=(ss, sharding.batch_sharded(mesh)),
                   out_shardings=(ss, sharding.replicated(mesh)), donate_argnums=0,
                   compiler_options=compiler.conv_options())


# --- checkpoints ---------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    """Asynchronous saves into <workdir>/checkpoints, keeping the last checkpoint.keep."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, config) -> None:
    step = int(state.step)
    meta = {"model": model_spec(config), "seed": config.seed, "step": step,
            "config": json.loads(config.to_json_best_effort())}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, target: TrainState, shardings):
    """Restores `step` onto the current devices (any count): shapes from `target`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            target, shardings)
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]


def _step_dir(path: str):
    """(checkpoints dir, step) for a workdir, its checkpoints/ dir, or one step's folder."""
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(base)
    ckpts = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
    if not steps:
        raise CheckpointError(f"no srno-jax checkpoint in {path}: expected a training workdir, "
                              "its checkpoints/ folder, or a step folder such as checkpoints/1000")
    return ckpts, steps[-1]


def load_for_inference(path: str):
    """(model, {'params': ...}) from an Orbax checkpoint of this package, on one device."""
    ckpts, step = _step_dir(path)
    with open(os.path.join(ckpts, str(step), "meta", "metadata")) as f:
        meta = json.load(f)
    model = model_from_spec(meta["model"])
    tx = make_optimizer(ml_collections.ConfigDict(meta["config"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: init_state(model, tx, 0)))
    # Read the one item directly: a read-only CheckpointManager only adds warnings here.
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(ckpts, str(step), "state"), target)
    return model, {"params": state.params}


# --- the loop ------------------------------------------------------------------------------

class _StopSignal:
    """SIGTERM/SIGINT ask the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        # A second signal gets the default behaviour: the user insists.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_loader(config, start_step: int, source=None):
    """This host's TrainLoader from `start_step` (the source made from config if None)."""
    d = config.data
    source = source or input_pipeline.make_source(d.train, "train", d.get("data_dir"))
    return input_pipeline.TrainLoader(
        source, global_batch=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        inp_size=d.inp_size, scale_min=d.scale_min, scale_max=d.scale_max, augment=d.augment,
        sample_q=d.sample_q or None, repeat=d.repeat, workers=d.workers or None,
        prefetch=d.prefetch, processes=d.worker_processes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, resuming from the latest checkpoint in `workdir`.

    Returns the last validation results ({scale: (psnr, bicubic psnr)}) if any ran.
    """
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    input_pipeline.check_config(config.data.inp_size, config.data.scale_min,
                                config.data.scale_max, config.data.sample_q or None)
    model = model_from_config(config)
    tx = make_optimizer(config)
    source = input_pipeline.make_source(config.data.train, "train", config.data.get("data_dir"))
    spe = config.steps_per_epoch or input_pipeline.steps_per_epoch(
        len(source), config.data.repeat, config.batch_size)
    total = config.total_steps or config.optim.epochs * spe

    state = init_state(model, tx, config.seed)
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    mngr = checkpoint_manager(workdir, config)
    if mngr.latest_step() is not None:
        # The architecture is checked before the arrays are read: Orbax's own shape error
        # would not say which setting differs.
        meta = mngr.restore(mngr.latest_step(),
                            args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta["model"] != model_spec(config):
            raise CheckpointError(f"{workdir} holds a checkpoint of model {meta['model']}, "
                                  f"but the config asks for {model_spec(config)}; use another "
                                  "--workdir or the matching config")
        state = restore_checkpoint(mngr, mngr.latest_step(), state, shardings)
        log.info("resumed from step %d", int(state.step))
    step_fn = compile_step(model, tx, config, spe, mesh, state)

    val_images = []
    if config.data.val and jax.process_index() == 0:
        val_src = input_pipeline.make_source(config.data.val, "validation", config.data.get("data_dir"))
        val_images = [val_src[i] for i in range(min(len(val_src), config.eval.max_images))]
    writer = _summary_writer(workdir)

    start_step, t0, results = int(state.step), time.time(), {}
    loader = make_loader(config, start_step, source)
    log.info("training %s on %d device(s) of %d host(s): batch %d (%d per host), %d steps/epoch, "
             "steps %d..%d", config.model.encoder, jax.device_count(), jax.process_count(),
             config.batch_size, loader.local, spe, start_step, total)
    with loader, _StopSignal() as stop:
        step, last_log, last_t = start_step, start_step, time.time()
        while step < total:
            batch = sharding.to_global(next(loader), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            stop_reason = stop.received
            if config.max_train_minutes and time.time() - t0 > 60 * config.max_train_minutes:
                stop_reason = stop_reason or "time limit"
            if step % config.log_every_steps == 0 or step == total or stop_reason:
                m = jax.device_get(metrics)
                if int(state.nonfinite) >= config.max_nonfinite_steps:
                    mngr.wait_until_finished()  # a save in flight completes; none is started
                    raise TrainingDiverged(
                        f"loss or gradient non-finite for {int(state.nonfinite)} steps in a row, "
                        f"up to step {step}; the last good checkpoint is kept in {workdir}. "
                        "Lower optim.lr or check the data.")
                now = time.time()
                rate = (step - last_log) * config.batch_size / max(now - last_t, 1e-9)
                eta = (total - step) * config.batch_size / max(rate, 1e-9)
                log.info("step %d/%d  loss %.4f  lr %.3g  %.1f samples/s  ETA %s", step, total,
                         m["loss"], m["lr"], rate, _hms(eta))
                _scalars(writer, step, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"],
                         samples_per_s=rate)
                last_log, last_t = step, now
            if step % config.checkpoint.every_steps == 0 or step == total or stop_reason:
                save_checkpoint(mngr, state, config)
            if val_images and (step % config.eval.every_steps == 0 or step == total or stop_reason):
                results = _validate_and_log(writer, model, state.params, val_images, config, step)
            if stop_reason:
                log.info("stopping at step %d (%s); checkpoint saved, rerun to resume", step,
                         stop_reason)
                break
    mngr.wait_until_finished()
    mngr.close()
    if writer:
        writer.close()
    return results


def setup_logging() -> None:
    """Progress lines from this package on stderr; libraries (Orbax, absl) at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _summary_writer(workdir):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _scalars(writer, step, **values):
    if writer:
        for k, v in values.items():
            writer.add_scalar(f"train/{k}", float(v), step)


def _validate_and_log(writer, model, params, images, config, step):
    params = jax.device_get(params)
    results = evaluation.validate(model, params, images, config.eval.scales, config.eval.protocol)
    for s, (p, b) in results.items():
        log.info("validation x%g: PSNR %.2f dB (bicubic %.2f)", s, p, b)
        if writer:
            writer.add_scalar(f"val/psnr_x{s:g}", p, step)
    if writer:
        sr = evaluation.model_upsampler(model, {"params": params})
        for s in config.eval.scales:
            writer.add_image(f"val/x{s:g}_bicubic_sr_gt",
                             evaluation.comparison_strip(sr, images[0], s), step, dataformats="HWC")
    return results
