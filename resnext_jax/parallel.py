"""The 1-D `data` mesh that training and inference both run on: the axis name, the mesh over every device, the
batch-size check, and the shardings of the replicated state and of a global batch.

The same code runs on one CPU, one GPU, or many hosts: each process feeds its own slice of the global batch, and
`jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnext_jax.errors import ConfigError

AXIS = "data"  # the mesh axis the batch is split over, and the BatchNorm sync axis under shard_map


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis name `data`, ordered by process: process p's devices hold rows
    [p * local_batch, (p + 1) * local_batch) of every global batch, the rows `data.train_order` gives it."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (AXIS,))


def check_batch_size(batch_size: int, num_devices: int, name: str = "batch_size", grad_accum_steps: int = 1) -> int:
    """Returns the per-process batch size; raises ConfigError (a ValueError) naming valid sizes if the batch does not
    split evenly."""
    unit = num_devices * grad_accum_steps
    if batch_size % unit:
        lower, upper = (batch_size // unit) * unit, (batch_size // unit + 1) * unit
        what = f"{num_devices} devices" + (f" x {grad_accum_steps} grad_accum_steps" if grad_accum_steps > 1 else "")
        options = " or ".join(str(s) for s in (lower, upper) if s > 0)
        per_step = batch_size // grad_accum_steps if batch_size % grad_accum_steps == 0 else 0
        counts = [str(count) for count in range(1, per_step + 1) if per_step % count == 0][:16]
        devices = f", or run on a device count that divides it: {', '.join(counts)}" if counts else ""
        raise ConfigError(
            f"{name}={batch_size} is not divisible by {what}; use a multiple of {unit} (e.g. --config.{name}={options})"
            + devices
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
