"""Data parallelism over a 1-D device mesh: one code path for 1 device, 8 fake ones, a pod.

Also how a process joins a multi-host run, and how all hosts agree on a decision.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import zlib

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srno_jax.config_checks import dotted
from srno_jax.errors import ConfigError, HostError, summary

log = logging.getLogger("srno_jax")


def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster JAX would join by itself, or None.

    Uses JAX's own detectors (`jax.distributed.initialize` picks the first present,
    opt-in ones excluded): Open MPI, SLURM, Cloud TPU (GKE and GCE), Kubernetes. A
    detected cluster of one process (a 1-task SLURM job, a single TPU VM) counts as none:
    it needs no coordinator. A JAX that keeps its detectors elsewhere falls back to the
    task counts of SLURM and Open MPI, so that a single-host run still starts.
    """
    try:
        from jax._src import clusters  # JAX's detectors have no public name yet

        detectors = clusters.ClusterEnv._cluster_types
    except (ImportError, AttributeError):
        log.warning(
            "this JAX's cluster detectors were not found; only SLURM and Open MPI are "
            "recognised, from their variables (other clusters: %s)",
            _BY_HAND,
        )
        return _cluster_from_variables()
    for env in detectors:
        if not env.opt_in_only_method and env.is_env_present():
            count = env.get_process_count()
            return (
                (env.name if hasattr(env, "name") else env.__name__, count) if count > 1 else None
            )
    return None


def _cluster_from_variables() -> tuple[str, int] | None:
    """A SLURM job step or an Open MPI run of more than one task, from its variables
    (which `jax.distributed.initialize` reads by itself), or None."""
    for name, variable in (("SLURM", "SLURM_NTASKS"), ("Open MPI", "OMPI_COMM_WORLD_SIZE")):
        count = _env_int(None, variable)
        if count is not None and count > 1:
            return name, count
    return None


_BY_HAND = (
    "give the coordinator, process count and process id by hand with --coordinator_address, "
    "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
    "JAX_PROCESS_ID), or run alone with --num_processes=1"
)


def _env_int(value: int | None, name: str) -> int | None:
    if value is not None or not os.environ.get(name):
        return value
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(
            f"{name}={os.environ[name]!r} is not an integer; fix or unset it"
        ) from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> str:
    """Joins a multi-host run with `jax.distributed.initialize`; returns how, for the log.

    Each value is its argument, else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES or
    JAX_PROCESS_ID. One process (num_processes 1) is a plain single-host run: no cluster
    is looked for. All three values given: JAX's cluster detection is off. Otherwise a
    cluster found by `detect_cluster` (SLURM, Open MPI, Cloud TPU, Kubernetes) fills in
    the rest, as JAX recommends; one process outside any cluster stays a single-host run
    with no coordinator. A failure to detect or to join is a `ConfigError` naming the
    flags that set the values by hand. JAX aborts the process (a C++ fatal error, no
    exception) when the others have not all joined within `timeout_s`; a line on stderr
    says why just before.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int(num_processes, "JAX_NUM_PROCESSES")
    process_id = _env_int(process_id, "JAX_PROCESS_ID")
    if num_processes == 1:
        return "single process"
    given = (coordinator_address, num_processes, process_id)
    explicit = None not in given
    try:
        cluster = None if explicit else detect_cluster()
    except Exception as e:  # a detector's own failure, e.g. Kubernetes outside a Job
        raise ConfigError(f"detecting the cluster failed ({summary(e)}); {_BY_HAND}") from None
    if cluster is None and given == (None, None, None):
        return "single process"
    # Collectives between CPU processes need an implementation: 'gloo' is this JAX's
    # default; older versions defaulted to none, and the first all-reduce failed.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its SIGTERM handler only logs the signal, which then neither stops the run nor
    # reaches the run's own handlers (train.StopVote).
    jax.config.update("jax_enable_preemption_service", False)
    how = f"the {cluster[0]} cluster" if cluster else "the multi-host run"
    count = num_processes or (cluster[1] if cluster else "?")
    log.info(
        "joining %s of %s processes; waiting up to %d s for all of them", how, count, timeout_s
    )
    late = threading.Timer(
        max(timeout_s - 5, 1),
        lambda: print(
            f"error: the {count} processes of {how} have not all joined after {timeout_s - 5} "
            f"s, and JAX will now abort; start all of them (srun -n {count}, not python "
            f"alone in the batch script), check that they reach the coordinator, or {_BY_HAND}",
            file=sys.stderr,
            flush=True,
        ),
    )
    late.daemon = True
    late.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            cluster_detection_method="deactivate" if explicit else None,
            initialization_timeout=timeout_s,
        )
    except Exception as e:
        raise ConfigError(f"joining {how} failed ({summary(e)}); {_BY_HAND}") from None
    finally:
        late.cancel()
    how = "explicit settings" if explicit else f"cluster {cluster[0]}" if cluster else "settings"
    return f"{how}: process {jax.process_index()} of {jax.process_count()}"


def make_mesh() -> jax.sharding.Mesh:
    """A ('data',) mesh over every device of every host.

    Axis type Auto: `jax.jit` propagates the batch sharding through the model and adds
    the gradient all-reduce (newer JAX defaults to Explicit, which would need sharding
    annotations on every gather of the lifting).
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's 'data' axis."""
    return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch: int, mesh) -> None:
    """A clear error when the batch does not split evenly over the mesh's devices."""
    n_dev = mesh.devices.size
    if global_batch % n_dev:
        ok = n_dev * max(1, round(global_batch / n_dev))
        raise ConfigError(
            f"batch_size {global_batch} is not divisible by the {n_dev} devices; "
            f"use a multiple of {n_dev}, e.g. --config.batch_size={ok}"
        )


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Joins each host's share of a batch into global arrays sharded over 'data'."""
    sharding = batch_sharded(mesh)
    n = jax.process_count()

    def put(x):
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n, *x.shape[1:]))

    return {k: put(v) for k, v in batch.items()}


def host_values(value: int, mesh) -> jax.Array:
    """An int32 array with one entry per device, each host filling its own devices' entries
    with `value`: how a host's vote enters a jitted step sharded over 'data'."""
    local = np.full(len(mesh.local_devices), value, np.int32)
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local, (mesh.devices.size,))


def host_ints(value: int) -> np.ndarray:
    """Every host's `value` (a small int), indexed by process index.

    A collective: every host must call it at the same point. One process: [value].
    """
    if jax.process_count() == 1:
        return np.asarray([value], np.int32)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).ravel()


def check_same(value: int, what: str, fix: str) -> None:
    """Raises `ConfigError` on every host unless every host has the same `value` (a small
    int): the count of `what`. A collective."""
    values = host_ints(value)
    if (values != values[0]).any():
        each = ", ".join(f"process {i}: {v}" for i, v in enumerate(values))
        raise ConfigError(f"the hosts see different numbers of {what} ({each}); {fix}")


def check_even_devices() -> None:
    """Raises `ConfigError` unless every process has the same number of devices, as the
    mesh and every all-gather need (a node with a dead GPU would fail in a reshape).
    Not a collective: each process sees every device's process."""
    counts = np.bincount([d.process_index for d in jax.devices()], minlength=jax.process_count())
    if (counts != counts[0]).any():
        each = ", ".join(f"process {i}: {n}" for i, n in enumerate(counts))
        raise ConfigError(
            f"the processes have different numbers of devices ({each}); give every process "
            "the same number (CUDA_VISIBLE_DEVICES, JAX_LOCAL_DEVICE_IDS)"
        )


def crc(text: str) -> int:
    """A checksum of `text` that fits `host_ints`."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF  # an int32 for `host_ints`


# Fields each host may set for itself: where its copy of the data lies, and how many
# loader workers its cores allow. Neither changes a batch (the image count is compared
# apart, and a batch is a function of the seed and the step).
PER_HOST_FIELDS = frozenset(
    [
        "data.train",
        "data.val",
        "data.data_dir",
        "data.workers",
        "data.worker_processes",
        "data.prefetch",
    ]
)


def check_same_config(config) -> None:
    """Raises `ConfigError` on every host, naming the fields that differ, unless every
    host was given the same config but for `PER_HOST_FIELDS`: a host with another
    learning rate, batch size or number of steps would train replicas that drift apart,
    or wait forever in another collective. A collective."""
    flat = {k: repr(v) for k, v in dotted(config.to_dict()).items() if k not in PER_HOST_FIELDS}
    keys = sorted(flat)
    own = crc("\n".join(f"{k}={flat[k]}" for k in keys))
    if (host_ints(own) == own).all():  # the same decision on every host
        return
    fix = "start every host with the same --config and flags"
    names = crc("\n".join(keys))
    if not (host_ints(names) == names).all():
        raise ConfigError(f"the hosts were given configs with different fields; {fix}")
    from jax.experimental import multihost_utils

    each = np.asarray([crc(f"{k}={flat[k]}") for k in keys], np.int32)
    every = np.asarray(multihost_utils.process_allgather(each)).reshape(-1, len(keys))
    differ = [k for j, k in enumerate(keys) if (every[:, j] != every[0, j]).any()]
    here = ", ".join(f"{k}={flat[k]}" for k in differ[:4])
    raise ConfigError(
        f"the hosts were given different configs: {', '.join(differ)} "
        f"(process {jax.process_index()} has {here}); {fix}"
    )


def raise_together(error: Exception | None, what: str) -> None:
    """The decision of all hosts whether to go on: raises on every host if any host has
    `error`, that error where it happened and a `HostError` naming the first process that
    failed and `what` elsewhere. A collective."""
    failed = np.flatnonzero(host_ints(error is not None))
    if error is not None:
        raise error
    if failed.size:
        raise HostError(f"process {failed[0]} failed {what}; its log names the error")
