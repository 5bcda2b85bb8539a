"""Data parallelism over a 1-D device mesh: one code path for 1 device, 8 fake ones, a pod."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from srno_jax.errors import ConfigError


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-host run (`jax.distributed.initialize`); a no-op for one process.

    On Cloud TPU pods and SLURM/Kubernetes GPU clusters JAX finds the arguments itself;
    elsewhere pass them (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
    """
    if coordinator_address is None and num_processes in (None, 1):
        return
    # Collectives between CPU processes need an implementation: 'gloo' is this JAX's
    # default; older versions defaulted to none, and the first all-reduce failed.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def make_mesh() -> jax.sharding.Mesh:
    """A ('data',) mesh over every device of every host.

    Axis type Auto: `jax.jit` propagates the batch sharding through the model and adds
    the gradient all-reduce (newer JAX defaults to Explicit, which would need sharding
    annotations on every gather of the lifting).
    """
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


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
        raise ConfigError(f"batch_size {global_batch} is not divisible by the {n_dev} devices; "
                          f"use a multiple of {n_dev}, e.g. --config.batch_size={ok}")
    return global_batch // n_proc


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Joins each host's share of a batch into global arrays sharded over 'data'."""
    sharding = batch_sharded(mesh)
    n = jax.process_count()

    def put(x):
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n, *x.shape[1:]))

    return {k: put(v) for k, v in batch.items()}
