"""Training: the train state, the jitted data-parallel step, and the loop.

One code path for every scale of hardware: the batch is sharded over a ('data',) mesh of
all devices of all hosts, parameters are replicated, and `jax.jit` inserts the gradient
all-reduce. Host p builds only its share of each global batch. Every decision to stop
(a signal, the time limit, divergence, an error on one host) is shared by all hosts: each
host's vote rides in the step itself, so all of them stop after the same step and save
the same checkpoint, or none after an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, ContextManager, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from srno_jax import checkpoints, compiler, evaluation, sharding
from srno_jax.config_checks import dotted
from srno_jax.errors import CheckpointError, ConfigError, HostError, SRNOError, summary
from srno_jax.metric_writer import MetricWriter
from srno_jax.models import SRNO, init_variables, spec_of
from srno_jax.models import fused as fused_kernels
from srno_jax.schedules import lr_at_epoch
from srno_jax.workdir import WorkdirLock, check_writable, is_uri, lock_token, resolve

log = logging.getLogger("srno_jax")

# Stop votes: bits of one int per host, combined by max in the step. STOP_ERROR is the
# highest bit, so the max keeps it whatever the other hosts vote.
STOP_SIGNAL, STOP_TIME, STOP_ERROR = 1, 2, 4


class TrainingDiverged(SRNOError):
    """Too many non-finite steps in a row."""


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs; the data position is `step` (one batch a step)."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array  # consecutive steps skipped for a non-finite loss or update


@dataclasses.dataclass
class TrainData:
    """What the training loop needs of the data, wired in by the caller (`train_cli`).

    batches: start step -> a context manager yielding this host's share of each global
      batch from that step on ({'inp', 'coord', 'cell', 'gt'} float32 numpy arrays).
    steps_per_epoch: batches in one epoch (the schedule's unit).
    val_images: HR uint8 images for validation (process 0 only; empty: none).
    images: training images (or pairs) this host sees, which every host must agree on.
    """

    batches: Callable[[int], ContextManager[Iterator[dict]]]
    steps_per_epoch: int
    val_images: Sequence[np.ndarray] = ()
    images: int = 0


def model_from_config(config, mesh=None) -> SRNO:
    """The config's model; its fused kernels (`fused_kernels`) on GPUs where they run on
    every host (agreed: a collective there, as every host builds the model), each device
    running them on its share of the batch when the step is jitted over `mesh`."""
    dtype, m = config.compute_dtype, config.model
    # The step's query points: sample_q, or the whole inp_size^2 crop where it is 0.
    n, d = config.data.sample_q or config.data.inp_size**2, m.width // m.heads
    fused = config.fused_kernels and jax.default_backend() == "gpu" and fused_kernels.supports(n, d)
    if fused:
        fused = bool(sharding.host_ints(int(fused_kernels.works_here(dtype, n, d))).all())
    return checkpoints.model_from_spec(
        checkpoints.model_spec(config), dtype, fused, mesh if fused else None
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam's moment estimates only; the epoch's learning rate is applied in the step.

    Taking the rate from the state's step (not the optimizer's own count) keeps the
    schedule on the data's epochs even when a non-finite step is skipped.
    """
    o = config.optim
    return optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)


def learning_rate(step, config, steps_per_epoch: int):
    o = config.optim
    return lr_at_epoch(
        step // steps_per_epoch + 1,
        base_lr=o.lr,
        warmup_mult=o.warmup_mult,
        warmup_epochs=o.warmup_epochs,
        total_epochs=o.epochs,
    )


def init_state(model: SRNO, tx, seed: int) -> TrainState:
    params = init_variables(model, seed)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        nonfinite=jnp.zeros((), jnp.int32),
    )


def l1_loss(params, model: SRNO, batch) -> jax.Array:
    """The paper's loss: mean absolute error of the prediction at the batch's queries."""
    pred = model.apply({"params": params}, batch["inp"], batch["coord"], batch["cell"])
    return jnp.mean(jnp.abs(pred - batch["gt"]))


class _Flat:
    """The parameter-shaped parts of a tree (parameters, gradients, Adam's moments), each
    as one vector, and back.

    The optimizer's update and the non-finite guard then run on a few vectors, a handful
    of kernels, not on each parameter array (hundreds of tiny launches on a GPU). The
    state keeps its leaves: checkpoints hold the tree a notebook loads.
    """

    def __init__(self, params):
        self.leaves, self.treedef = jax.tree.flatten(params)

    def _matches(self, tree) -> bool:
        return jax.tree.structure(tree) == self.treedef

    def ravel(self, tree):
        cat = lambda t: jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(t)])
        return jax.tree.map(
            lambda t: cat(t) if self._matches(t) else t, tree, is_leaf=self._matches
        )

    def unravel(self, tree, like):
        """`ravel`'s inverse, given the tree `like` that was ravelled."""
        offsets = np.cumsum([x.size for x in self.leaves])[:-1]

        def split(v, t):  # each part in its leaf's shape and dtype
            parts = zip(jnp.split(v, offsets), jax.tree.leaves(t))
            return self.treedef.unflatten([p.reshape(x.shape).astype(x.dtype) for p, x in parts])

        return jax.tree.map(
            lambda t, v: split(v, t) if self._matches(t) else v, like, tree, is_leaf=self._matches
        )


def train_step(
    state: TrainState, batch, stop_votes, *, model: SRNO, tx, config, steps_per_epoch: int
):
    """One step of L1 + Adam. A non-finite loss, gradient, learning rate or updated
    parameter leaves the state as it was (but for the step and the non-finite count).
    `stop_votes` holds one vote per device; their max comes back as metrics['stop']."""
    loss, grads = jax.value_and_grad(l1_loss)(state.params, model, batch)
    flat = _Flat(state.params)
    grads, params, opt_state = flat.ravel((grads, state.params, state.opt_state))
    grad_norm = jnp.sqrt(jnp.sum(grads * grads))
    lr = learning_rate(state.step, config, steps_per_epoch)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = params - lr * updates
    finite = (
        jnp.isfinite(loss)
        & jnp.isfinite(grad_norm)
        & jnp.isfinite(lr)
        & jnp.isfinite(new_params).all()
    )
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = flat.unravel(
        keep((new_params, new_opt_state), (params, opt_state)), (state.params, state.opt_state)
    )
    new = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
    )
    return new, {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "finite": finite,
        "stop": jnp.max(stop_votes),
    }


def state_shardings(state, mesh):
    return jax.tree.map(lambda _: sharding.replicated(mesh), state)


def jit_step(model, tx, config, steps_per_epoch, mesh, state):
    """The jitted step: batch and votes sharded over 'data', state replicated and donated."""
    fn = lambda s, b, v: train_step(
        s, b, v, model=model, tx=tx, config=config, steps_per_epoch=steps_per_epoch
    )
    ss, data = state_shardings(state, mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        fn,
        in_shardings=(ss, data, data),
        out_shardings=(ss, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler.conv_options(),
    )


_ORDER_FLAGS = {  # the config fields in `_data_order`
    "batch_size": "batch_size",
    "seed": "seed",
    "repeat": "data.repeat",
    "steps_per_epoch": "steps_per_epoch",
}


# Fields a resumed run may change without a word: how long it runs, how often it logs,
# saves and validates, how this host loads its data, and what a new run starts from. The
# model and the data order are compared apart (refused); any other change is said
# (`_warn_changed_settings`).
_RUN_FIELDS = (
    "init_from",
    "total_steps",
    "max_train_minutes",
    "log_every_steps",
    "checkpoint.",
    "eval.",
    *(f for f in sharding.PER_HOST_FIELDS if f != "data.train"),
)


def _warn_changed_settings(meta: dict, config, where) -> None:
    """Warns (process 0) of the settings that differ from those `meta`'s step was trained
    with, such as the learning rate or compute dtype: they apply from the resumed step
    on, which may be meant, or a mistyped flag."""
    there = dotted(meta.get("config", {}))
    here = dotted(json.loads(config.to_json_best_effort()))
    changed = [
        k
        for k in sorted(there.keys() & here.keys())
        if there[k] != here[k] and not k.startswith(("model.", *_RUN_FIELDS))
    ]
    if changed and jax.process_index() == 0:
        log.warning(
            "resuming %s with settings other than its checkpoint's, from here on: %s",
            where,
            ", ".join(f"{k} {there[k]!r} -> {here[k]!r}" for k in changed),
        )


def _data_order(config, data: dict) -> dict:
    """What fixes each step's batch and learning rate besides the step: `data` (the
    run's steps per epoch and training images) with the seed, batch size and repeat."""
    return dict(batch_size=config.batch_size, seed=config.seed, repeat=config.data.repeat, **data)


def restore_or_init(mngr, model, tx, config, mesh, order: dict) -> TrainState:
    """The newest readable checkpoint in `mngr` on the mesh, or a fresh state: step 0,
    Adam's state zero, and the parameters of `config.init_from` where it is set
    (`initial_params`), else a random initialisation.

    Refuses (`CheckpointError`, `ConfigError`) a checkpoint of another model, or one saved
    with another data order than this run's `order` (`_data_order`): resuming it would
    move the data position and the schedule's epochs.
    """
    state = init_state(model, tx, config.seed)
    shardings = state_shardings(state, mesh)

    checked = []  # the metadata of each step tried; the last is the one restored

    def check(meta):
        checkpoints.check_same_model(meta, config, mngr.directory)
        saved = checkpoints.saved_data_order(meta)
        changed = [k for k in order if saved.get(k) is not None and saved[k] != order[k]]
        if changed:
            was = lambda d: ", ".join(f"{k} {d[k]}" for k in changed)
            fix = [f"--config.{_ORDER_FLAGS[k]}={saved[k]}" for k in changed if k in _ORDER_FLAGS]
            if "images" in changed:
                fix.append(f"the same {saved['images']} training images")
            raise ConfigError(
                f"{mngr.directory} was trained with {was(saved)}; resuming with {was(order)} "
                "would shift the data order and the learning-rate epochs. Resume with "
                f"{' and '.join(fix)}, or start a new --workdir"
            )
        checked.append(meta)

    restored = checkpoints.restore_latest(mngr, state, shardings, check)
    if restored is not None:
        log.info("resumed from step %d", int(restored.step))
        _warn_changed_settings(checked[-1], config, mngr.directory)
        return restored
    if config.get("init_from"):
        error = None
        try:  # every host reads it: a file that one host lacks must not leave it behind
            state = state.replace(params=initial_params(config))
        except SRNOError as e:
            error = e
        sharding.raise_together(error, f"to read init_from {config.init_from}")
    return jax.device_put(state, shardings)


def check_init_from(config, workdir) -> None:
    """Refuses, before any work, an `init_from` that is not there when the run would
    read it: when `workdir` holds no step yet. A resuming run does not need it."""
    init_from = config.get("init_from")
    if not init_from:
        return
    if checkpoints.steps_in(resolve(workdir) / "checkpoints"):
        return
    if not resolve(init_from).exists():
        raise ConfigError(
            f"config field init_from = {init_from!r}: no such file or folder; give a "
            "reference .pth, or a workdir, step folder or export (or '' for none)"
        )


def initial_params(config) -> dict:
    """The parameters of the checkpoint `config.init_from` (any that `load_checkpoint`
    reads: a reference .pth, a workdir, a step folder, an export), for a new run to
    start from (fine-tuning). Raises `ConfigError` where that checkpoint's model is not
    the config's, naming both."""
    try:
        loaded, variables, what = checkpoints.read_checkpoint(config.init_from)
    except CheckpointError as e:
        raise ConfigError(f"config field init_from: {e}") from None
    wanted = checkpoints.model_from_spec(checkpoints.model_spec(config))
    if loaded != wanted:
        have, want = spec_of(loaded), spec_of(wanted)
        if have["encoder"] != want["encoder"]:
            builtin = "rdn" if have["encoder"] == "rdn" else "default"
            fix = f"its encoder is {have['encoder']}: start from --config {builtin}"
        else:
            have, want = dotted(have), dotted(want)
            fix = "set " + " ".join(
                f"--config.model.{k}={v}" for k, v in sorted(have.items()) if want.get(k) != v
            )
        raise ConfigError(f"init_from {what} holds another model than the config's; {fix}")
    if jax.process_index() == 0:
        log.info("starting from the parameters of %s", what)
    return variables["params"]


class StopVote:
    """This host's vote to stop: SIGTERM/SIGINT on any host, the time limit measured on
    process 0's clock alone, or an error in what this host does alone (`guard`).
    `votes(mesh)` is the vote as the step's input. A workdir lock that another run took
    over (`lock`, process 0's) is an error: this run must not save again. Its heartbeat
    finds that out; before a step that saves, the lock is read at once."""

    def __init__(self, max_minutes: float):
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        self.signal = None
        self.error = None
        self.lock = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        # A second signal gets the handler from before (main.py's stops at once): the
        # user insists.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def guard(self, what: str, step: int):
        """Keeps this host's first error in `what` instead of raising it: the other hosts
        would wait for this one in the next collective. The next step carries the vote."""
        try:
            yield
        except Exception as e:
            if self.error is None:
                self.error = (
                    e
                    if isinstance(e, SRNOError)
                    else HostError(
                        f"{what} failed at step {step}: {summary(e)}; "
                        "rerun to resume from the last checkpoint"
                    )
                )

    def votes(self, mesh, saving: bool = False) -> jax.Array:
        """This host's vote for a step; `saving`: the step saves whatever the vote."""
        late = (
            self.deadline is not None and jax.process_index() == 0 and time.time() > self.deadline
        )
        if self.error is None and self.lock is not None:
            if saving or late or self.signal:
                self.lock.check()
            self.error = self.lock.lost
        vote = (
            (STOP_SIGNAL if self.signal else 0)
            | (STOP_TIME if late else 0)
            | (STOP_ERROR if self.error else 0)
        )
        return sharding.host_values(vote, mesh)

    def raise_if_failed(self, agreed: int, step: int) -> None:
        """Raises on every host when the agreed vote holds a host's error (a collective)."""
        if agreed & STOP_ERROR:
            sharding.raise_together(
                self.error,
                f"by step {step}, so every host stopped there without saving it: rerun to resume",
            )

    def reason(self, agreed: int) -> str | None:
        if not agreed:
            return None
        if agreed & STOP_SIGNAL:
            return self.signal or "a signal to another host"
        return "time limit"


@contextlib.contextmanager
def hold_workdir(workdir):
    """Checks the workdir on every host and locks it on process 0 (yields the
    `WorkdirLock` there, None elsewhere); every host learns whether that worked, and
    that it sees the folder process 0 locked (a folder local to
    each host, or another path on one, would fail only at the first save, hours later)."""
    error, lock = None, None
    try:
        # Every host writes checkpoints: a read-only mount on one fails here, not at a save.
        check_writable(workdir)
        if jax.process_index() == 0:
            lock = WorkdirLock(workdir)
            lock.acquire()
    except SRNOError as e:
        error, lock = e, None
    except Exception as e:  # agreed below all the same: the other hosts wait for it
        lock = None
        error = ConfigError(
            f"cannot lock the workdir {workdir} ({summary(e)}); "
            "check that it is a folder you can write to"
        )
    try:
        sharding.raise_together(error, f"to check or lock the workdir {workdir}")
        seen = sharding.host_ints(sharding.crc(lock.token if lock else lock_token(workdir) or ""))
        if (seen != seen[0]).any():
            others = ", ".join(str(i) for i in np.flatnonzero(seen != seen[0]))
            relative = not is_uri(workdir) and not os.path.isabs(os.fspath(workdir))
            raise ConfigError(
                f"--workdir {resolve(workdir)} is not one folder for all hosts: "
                f"process(es) {others} do not see the lock file process 0 wrote in it; give "
                "every host the same shared folder (a network file system, or a gs:// bucket)"
                + (
                    "; a relative --workdir is taken from each host's current folder"
                    if relative
                    else ""
                )
            )
        yield lock
    finally:
        if lock:
            lock.release()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, data: TrainData) -> dict:
    """Trains per `config`, resuming from the newest readable checkpoint in `workdir`.

    Returns the last validation results ({scale: (psnr, bicubic psnr)}) if any ran.
    """
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    model, tx = model_from_config(config, mesh), make_optimizer(config)
    spe = config.steps_per_epoch or data.steps_per_epoch
    total = config.total_steps or config.optim.epochs * spe
    _warn_past_schedule(config, spe, total)
    keep_every = config.checkpoint.keep_every_epochs * spe  # kept whatever `keep` says
    # The signal handlers are on from here to the last save: a signal while starting,
    # restoring or saving is a vote to stop, not the end of the process.
    with (
        StopVote(config.max_train_minutes) as stop,
        hold_workdir(workdir) as lock,
        checkpoints.managed(workdir, config.checkpoint.keep, keep_every) as mngr,
    ):
        stop.lock = lock
        order = _data_order(config, {"steps_per_epoch": spe, "images": data.images})
        state = restore_or_init(mngr, model, tx, config, mesh, order)
        start = int(state.step)
        if start >= total:
            log.info(
                "the checkpoint at step %d already reaches total_steps %d: nothing to train",
                start,
                total,
            )
            return {}
        step_fn = jit_step(model, tx, config, spe, mesh, state)
        with stop.guard("opening the TensorBoard log", start):  # process 0's alone
            writer = MetricWriter(workdir, start)
        sharding.raise_together(stop.error, "to open its TensorBoard log")
        writer.log(
            "training %s on %d device(s) of %d host(s): batch %d (%d per host), "
            "%d steps/epoch, steps %d..%d",
            config.model.encoder,
            jax.device_count(),
            jax.process_count(),
            config.batch_size,
            config.batch_size // jax.process_count(),
            spe,
            start,
            total,
        )
        results = {}
        with contextlib.ExitStack() as stack:
            with stop.guard("starting the data loader", start + 1):
                batches = stack.enter_context(data.batches(start))
                batch = next(batches)
            sharding.raise_together(stop.error, "to start its data loader")
            step_fn = _compile(
                step_fn, writer, state, sharding.to_global(batch, mesh), stop.votes(mesh)
            )
            prev, last_log, last_t = None, start, time.time()
            for step in range(start + 1, total + 1):
                if step > start + 1 and stop.error is None:
                    # On an error the step still runs, on the last batch, to carry the vote.
                    with stop.guard("the data loader", step):
                        batch = next(batches)
                periodic = (
                    step % config.checkpoint.every_steps == 0
                    or (keep_every and step % keep_every == 0)
                    or step == total
                )
                votes = stop.votes(mesh, saving=periodic)
                state, metrics = step_fn(state, sharding.to_global(batch, mesh), votes)
                # The previous step's agreed vote, the same on every host: reading this
                # step's would wait for it. A save waits anyway, and reads this step's
                # too, so that no step a host's error spoiled is saved.
                agreed = int(prev["stop"]) if prev is not None else 0
                prev = metrics
                save = agreed or periodic
                if save:
                    agreed |= int(metrics["stop"])
                stop.raise_if_failed(agreed, step)
                reason = stop.reason(agreed)
                if step % config.log_every_steps == 0 or step == total or reason:
                    _check_divergence(state, step, config, mngr, workdir, start, total, reason)
                    rate = (step - last_log) * config.batch_size / max(time.time() - last_t, 1e-9)
                    with stop.guard("logging", step):
                        _log_progress(writer, step, total, metrics, rate, config.batch_size)
                    last_log, last_t = step, time.time()
                # A skipped step keeps the parameters of the last finite one: a periodic
                # save waits for the streak to end (it would push good checkpoints out),
                # a stop's or the last one saves them, unless no step was ever finite.
                # Their count is not saved: a resumed run starts from those parameters
                # with a streak of its own.
                skipped = int(state.nonfinite)
                saved = save and (skipped == 0 or ((reason or step == total) and skipped < step))
                if saved:
                    checkpoints.save(
                        mngr, state.replace(nonfinite=state.nonfinite * 0), config, order
                    )
                # A signal's grace period (SLURM's --signal, a preemption notice) is for
                # the save: a stop for a signal does not validate.
                if (
                    data.val_images
                    and not agreed & STOP_SIGNAL
                    and (step % config.eval.every_steps == 0 or step == total or reason)
                ):
                    with stop.guard("validation", step):
                        results = _validate(
                            writer, model, state.params, data.val_images, config, step
                        )
                if reason:
                    log.info(
                        "stopping at step %d (%s); %s",
                        step,
                        reason,
                        "checkpoint saved, rerun to resume"
                        if saved
                        else "no step was finite yet, so nothing is saved: a rerun starts afresh",
                    )
                    if agreed & STOP_SIGNAL:  # an earlier step's table is not this model's
                        results = {}
                    break
        checkpoints.finish(mngr)
        writer.close()
        # An error after the last vote (the last step's logging or validation).
        sharding.raise_together(stop.error, f"at step {step}")
    return results


def _warn_past_schedule(config, spe: int, total: int) -> None:
    if total > config.optim.epochs * spe and jax.process_index() == 0:
        log.warning(
            "total_steps %d runs past the learning-rate schedule, which ends at step %d "
            "(optim.epochs %d x %d steps/epoch): the steps after it train at rate 0. "
            "Raise --config.optim.epochs to %d to train them",
            total,
            config.optim.epochs * spe,
            config.optim.epochs,
            spe,
            -(-total // spe),
        )


def _compile(step_fn, writer, *args):
    """`step_fn` compiled for `args`, its compile time logged on its own line, so that the
    first samples/s and ETA leave it out. Not guarded, as no step is: out of memory here
    gets train_cli's advice."""
    with compiler.CompileClock() as clock:
        compiled = step_fn.lower(*args).compile()
    writer.log(
        "compiled the step in %.1f s (%.1f s tracing and lowering, %.1f s in XLA%s)",
        clock.compile_s,
        clock.tracing,
        clock.xla,
        ", from the persistent cache" if clock.cache_hits else "",
    )
    return compiled


def _check_divergence(state, step, config, mngr, workdir, start: int, total: int, reason=None):
    """Raises `TrainingDiverged` after max_nonfinite_steps non-finite steps in a row within
    this run, or at its `total` step when no step since the first ever was finite. At
    the last step or a stop (`reason`), a shorter streak is warned of.

    Skipped steps leave the parameters alone, so the whole streak evaluated the state
    saved just before it: that checkpoint is deleted if this run wrote it, and the error
    names the last one left. The one the run resumed from (`start`) is kept: a streak
    right after it may come from this run's config (an infinite learning rate), and a
    retry would otherwise delete one more good checkpoint each time. Every host reads
    the same replicated counter, so all of them raise.
    """
    n = int(state.nonfinite)
    first_bad = step - n + 1
    if n < config.max_nonfinite_steps and not (step == total and first_bad == 1):
        if (step == total or reason) and n and first_bad > 1 and jax.process_index() == 0:
            log.warning(
                "the last %d step(s), %d..%d, were non-finite and skipped: the checkpoint "
                "saved now holds the parameters of step %d",
                n,
                first_bad,
                step,
                first_bad - 1,
            )
        return
    checkpoints.finish(mngr)
    kept = checkpoints.delete_after(mngr, max(first_bad - 1, start + 1))
    good = (
        f"the last good checkpoint, step {kept}, is kept in {workdir}"
        if kept is not None
        else f"no checkpoint before the divergence is left in {workdir}"
    )
    raise TrainingDiverged(
        f"loss or update non-finite for {n} steps in a row, steps {first_bad}..{step}; {good}. "
        "Lower optim.lr or check the data."
    )


def _log_progress(writer, step, total, metrics, rate, batch_size):
    m = jax.device_get(metrics)
    eta = (total - step) * batch_size / max(rate, 1e-9)
    writer.log(
        "step %d/%d  loss %.4f  lr %.3g  %.1f samples/s  ETA %s",
        step,
        total,
        m["loss"],
        m["lr"],
        rate,
        _hms(eta),
    )
    writer.scalars(
        step, "train", loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"], samples_per_s=rate
    )


def _validate(writer, model, params, images, config, step):
    params = jax.device_get(params)
    results = evaluation.validate(model, params, images, config.eval.scales, config.eval.protocol)
    for s, (p, b) in results.items():
        writer.log("validation x%g: PSNR %.2f dB (bicubic %.2f)", s, p, b)
        writer.scalars(step, "val", **{f"psnr_x{s:g}": p})
    sr = evaluation.model_upsampler(model, {"params": params})
    for s in config.eval.scales:
        writer.image(
            step, f"val/x{s:g}_bicubic_sr_gt", evaluation.comparison_strip(sr, images[0], s)
        )
    return results


def setup_logging() -> None:
    """Progress lines from this package on stderr; absl's (Orbax's) only when fatal.

    Orbax logs a traceback per failed background write; `checkpoints` reports each
    failure in one line instead."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.FATAL)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
