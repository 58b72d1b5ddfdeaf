"""Devices, processes and the 1-D `data` mesh: multi-host start-up, batch-size checks, global batches.

The same code runs on one CPU, one GPU, or many hosts: each process feeds its own slice of the global batch,
and `jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnext_jax.training.config import ConfigError
from resnext_jax.training.step import AXIS

_CLUSTER_ENV = {
    "explicit": ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"),
    "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "tpu": ("TPU_WORKER_HOSTNAMES",),
    "openmpi": ("OMPI_COMM_WORLD_SIZE",),
}


def detect_cluster() -> str | None:
    """Which multi-process launcher started us ('explicit', 'slurm', 'tpu', 'openmpi'), or None for one process."""
    env = os.environ
    if all(env.get(k) for k in _CLUSTER_ENV["explicit"]):
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    return None


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when launched under a cluster; a no-op for a single process.

    With the explicit variables JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    they are passed on; SLURM, Open MPI and TPU pods are auto-detected by JAX itself.
    """
    cluster = detect_cluster()
    if cluster is None or jax.distributed.is_initialized():
        return
    if cluster == "explicit":
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    logging.info(
        "jax.distributed initialized (%s): process %d of %d", cluster, jax.process_index(), jax.process_count()
    )


def barrier(name: str, timeout_s: float = 1800) -> None:
    """Waits until every process reaches `barrier(name)`; a no-op for a single process.

    Uses the coordination service (`jax.distributed`), whose wait can be long. Cross-process collectives on CPU
    (gloo) give the other processes only 30 s to set up their side, and processes drift apart by more than that
    before their first collective: one builds the dataset or compiles while another waits
    (tests/test_train_multihost.py failed so in CI, "Gloo context initialization failed: GetKeyValue() timed out").
    """
    from jax._src import distributed as jax_distributed  # the client JAX's own array serialization uses

    client = jax_distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return
    client.wait_at_barrier(f"resnext_jax:{name}", timeout_in_ms=int(timeout_s * 1000))


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis name `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def check_batch_size(batch_size: int, num_devices: int, name: str = "batch_size", grad_accum_steps: int = 1) -> int:
    """Returns the per-process batch size; raises ConfigError (a ValueError) naming valid sizes if the batch does not
    split evenly."""
    unit = num_devices * grad_accum_steps
    if batch_size % unit:
        lower, upper = (batch_size // unit) * unit, (batch_size // unit + 1) * unit
        what = f"{num_devices} devices" + (f" x {grad_accum_steps} grad_accum_steps" if grad_accum_steps > 1 else "")
        options = " or ".join(str(s) for s in (lower, upper) if s > 0)
        raise ConfigError(
            f"{name}={batch_size} is not divisible by {what}; use a multiple of {unit} (e.g. --config.{name}={options})"
        )
    return batch_size // jax.process_count()


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that places a full copy on every device (the train state)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over `data`."""
    return NamedSharding(mesh, P(AXIS))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Turns this process's numpy slice of the batch into global jax Arrays sharded over `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
