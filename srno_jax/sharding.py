"""Data parallelism over a 1-D device mesh: one code path for 1 device, 8 fake ones, a pod.

Also how a process joins a multi-host run, and how all hosts agree on a decision.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srno_jax.errors import ConfigError

log = logging.getLogger("srno_jax")


def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster JAX would join by itself, or None.

    Uses JAX's own detectors (`jax.distributed.initialize` picks the first present,
    opt-in ones excluded): Open MPI, SLURM, Cloud TPU (GKE and GCE), Kubernetes. A
    detected cluster of one process (a 1-task SLURM job, a single TPU VM) counts as none:
    it needs no coordinator.
    """
    from jax._src import clusters  # JAX's detectors have no public name yet

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            count = env.get_process_count()
            return (
                (env.name if hasattr(env, "name") else env.__name__, count) if count > 1 else None
            )
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> str:
    """Joins a multi-host run with `jax.distributed.initialize`; returns how, for the log.

    Explicit arguments (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
    win; otherwise a cluster found by `detect_cluster` (SLURM, Open MPI, Cloud TPU,
    Kubernetes) is joined with no arguments, as JAX recommends. One process outside any
    cluster stays a plain single-host run with no coordinator.
    """
    explicit = coordinator_address is not None or num_processes not in (None, 1)
    cluster = None if explicit else detect_cluster()
    if not explicit and cluster is None:
        return "single process"
    # Collectives between CPU processes need an implementation: 'gloo' is this JAX's
    # default; older versions defaulted to none, and the first all-reduce failed.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    how = "explicit flags" if explicit else f"cluster {cluster[0]}"
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


def check_batch_size(global_batch: int, mesh) -> int:
    """The per-host batch size; a clear error when the batch does not split evenly."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch % n_dev:
        ok = n_dev * max(1, round(global_batch / n_dev))
        raise ConfigError(
            f"batch_size {global_batch} is not divisible by the {n_dev} devices; "
            f"use a multiple of {n_dev}, e.g. --config.batch_size={ok}"
        )
    return global_batch // n_proc


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


def agree(vote: int) -> int:
    """The bitwise OR of every host's `vote` (a small int): a decision all hosts share.

    A collective: every host must call it at the same point. One process: `vote` itself.
    """
    if jax.process_count() == 1:
        return int(vote)
    from jax.experimental import multihost_utils

    votes = multihost_utils.process_allgather(np.asarray(vote, np.int32))
    return int(np.bitwise_or.reduce(np.asarray(votes).ravel()))
