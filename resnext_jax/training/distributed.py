"""Processes: multi-host start-up, the dead-peer watch, barriers and small host collectives with deadlines, and
topology changes. The mesh itself (axis name, shardings, batch-size checks) is `resnext_jax.parallel`, which
training and inference share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnext_jax.errors import UserError

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


def maybe_initialize_distributed(peer_timeout_s: float = 60) -> None:
    """Calls `jax.distributed.initialize()` when launched under a cluster and starts the peer watch
    (`resnext_jax.training.peers`); a no-op for a single process.

    With the explicit variables JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID
    they are passed on; SLURM, Open MPI and TPU pods are auto-detected by JAX itself. The runtime's heartbeat
    timeout is twice `peer_timeout_s`, a backstop behind the peer watch (which acts at half of it).
    """
    global _peer_watch
    cluster = detect_cluster()
    if cluster is None or jax.distributed.is_initialized():
        return
    # The runtime's heartbeat is a backstop (it aborts from C++); the peer watch acts first, at peer_timeout_s / 2.
    timeouts = dict(heartbeat_timeout_seconds=int(2 * peer_timeout_s), shutdown_timeout_seconds=int(peer_timeout_s))
    if cluster == "explicit":
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            **timeouts,
        )
    else:
        jax.distributed.initialize(**timeouts)
    logging.info(
        "jax.distributed initialized (%s): process %d of %d", cluster, jax.process_index(), jax.process_count()
    )
    if jax.process_count() > 1:
        from resnext_jax.training.peers import PeerWatch, QuietRuntimeErrors

        if not os.environ.get("RESNEXT_JAX_VERBOSE"):  # set by `python -m train --verbose`
            QuietRuntimeErrors(jax.process_index(), jax.process_count())
        _peer_watch = PeerWatch(_client(), jax.process_index(), jax.process_count(), peer_timeout_s).start()


_peer_watch = None


@contextlib.contextmanager
def peer_watch_scope():
    """Runs the body of a training run under the peer watch: an error that a lost peer may have caused (anything
    but a UserError, or a PeerTimeout) waits for the watch's verdict, which exits with its one line; the watch
    stops at the end, telling the peers whether this process finished normally."""
    try:
        yield
    except BaseException as error:
        if not isinstance(error, UserError) or isinstance(error, PeerTimeout):
            wait_for_lost_peer()
        stop_peer_watch(finished=False)
        raise
    stop_peer_watch(finished=True)


def topology_change(saved: dict | None, global_batch: int) -> tuple[dict, dict] | None:
    """`(saved, current)` topologies ({process_count, device_count, global_batch}) when they differ, else None."""
    from resnext_jax.training.checkpoint import current_topology

    current = current_topology(global_batch)
    if saved is None or saved == current:
        return None
    return saved, current


def describe_topology_change(saved: dict, current: dict, local_batch: int) -> str:
    """The one log line of a resume on another topology."""
    return (
        f"resuming on another topology: {saved['process_count']} process(es) with {saved['device_count']} device(s) -> "
        f"{current['process_count']} with {current['device_count']}; the global batch stays {current['global_batch']} "
        f"({current['global_batch'] // current['device_count']} per device, {local_batch} per process), and the "
        f"data order continues from the step (config_changes.jsonl records the change)"
    )


def stop_peer_watch(finished: bool) -> None:
    """Stops the peer watch at the end of a run; `finished` (a normal end) tells the peers not to wait for us."""
    global _peer_watch
    if _peer_watch is not None:
        _peer_watch.stop(finished)
        _peer_watch = None


def wait_for_lost_peer() -> None:
    """After an error with several processes: if a peer died (and caused it), exits with the peer watch's one line;
    else returns at once (single process) or after the watch's judging time."""
    if _peer_watch is not None:
        _peer_watch.wait_for_verdict()


class PeerTimeout(UserError):
    """Another process did not answer in time: it died, hangs or is unreachable."""


def _client():
    """The distributed runtime's client (None for a single process)."""
    from jax._src import distributed as jax_distributed  # the client JAX's own array serialization uses

    return jax_distributed.global_state.client if jax.process_count() > 1 else None


def all_gather_json(name: str, value, timeout_s: float) -> list:
    """Every process's `value` (JSON-able), in process order, through the distributed runtime's key-value store.

    `name` must be new in this job (the store lives as long as the coordinator). Waits at most `timeout_s` for each
    other process; a process that never answers raises the runtime's DEADLINE_EXCEEDED error (and the peer watch
    ends the job if it died). A single process gets `[value]` at once.
    """
    client = _client()
    if client is None:
        return [value]
    prefix = f"resnext_jax/gather/{name}/"
    client.key_value_set(prefix + str(jax.process_index()), json.dumps(value))
    values = []
    for index in range(jax.process_count()):
        try:
            values.append(json.loads(client.blocking_key_value_get(prefix + str(index), int(timeout_s * 1000))))
        except Exception as error:  # noqa: BLE001 (the runtime's DEADLINE_EXCEEDED or UNAVAILABLE)
            raise PeerTimeout(
                f"process {index} of {jax.process_count()} did not answer {name!r} within {timeout_s:.0f} s "
                f"({str(error).splitlines()[0][:120]}); check that process, then rerun the same command on every "
                f"host to resume"
            ) from None
    return values


def barrier(name: str, timeout_s: float = 1800) -> None:
    """Waits until every process reaches `barrier(name)`; a no-op for a single process.

    Uses the coordination service (`jax.distributed`), whose wait can be long. Cross-process collectives on CPU
    (gloo) give the other processes only 30 s to set up their side, and processes drift apart by more than that
    before their first collective: one builds the dataset or compiles while another waits
    (tests/test_train_multihost.py failed so in CI, "Gloo context initialization failed: GetKeyValue() timed out").
    """
    client = _client()
    if client is None:
        return
    client.wait_at_barrier(f"resnext_jax:{name}", timeout_in_ms=int(timeout_s * 1000))


class HostTimes:
    """Each process's step time and data-wait fraction over a log window, gathered so that process 0 logs the
    slowest and fastest (`host_step_s_max`, `host_step_s_min`, `host_data_wait_max`): a straggling host shows in
    metrics.jsonl and TensorBoard. The step time is the window's wall time per step (an eval or a save inside the
    window counts too); the data wait is the fraction of it spent waiting for the next batch."""

    def __init__(self):
        self._start, self._waited, self._steps = time.perf_counter(), 0.0, 0

    def next(self, data_iterator):
        """`next(data_iterator)`, timed."""
        start = time.perf_counter()
        batch = next(data_iterator)
        self._waited += time.perf_counter() - start
        self._steps += 1
        return batch

    def gather(self) -> dict[str, float]:
        """The window's extremes over all processes (one small all-gather; every process must call it at the same
        step), and a new window."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        mine = np.array([elapsed / max(self._steps, 1), self._waited / elapsed], np.float64)
        everyone = multihost_utils.process_allgather(mine) if jax.process_count() > 1 else mine[None]
        everyone = np.asarray(everyone).reshape(-1, 2)
        self._start, self._waited, self._steps = time.perf_counter(), 0.0, 0
        return {
            "host_step_s_max": float(everyone[:, 0].max()),
            "host_step_s_min": float(everyone[:, 0].min()),
            "host_data_wait_max": float(everyone[:, 1].max()),
        }
