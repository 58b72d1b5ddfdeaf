"""Checkpoints with Orbax's `CheckpointManager`: async saves of the train state and the data-iterator position.

Layout: `<workdir>/checkpoints/<step>/{state,data,checksums}`. Orbax writes each step into a temporary directory
and renames it only once complete, so a save interrupted mid-write is never listed (and is cleaned up at the next
start). The latest `keep` checkpoints are kept, plus the one with the best eval top-1.

Each save also records a CRC-32 of every array and of the data-iterator state (`checksums`, committed with the
step). A restore verifies them and falls back, with one warning, to the newest step that verifies: a truncated,
bit-flipped or half-copied step is never loaded. Damaged steps are moved to `<workdir>/checkpoints_damaged/`, never
deleted, so that Orbax's retention never removes them and a rerun can save that step again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import zlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from resnext_jax.errors import UserError, drop_event_loop_noise, drop_unawaited_warnings
from resnext_jax.run_files import lists_item
from resnext_jax.training import distributed
from resnext_jax.training.step import TrainState

_COMMIT_MARKER = "commit_success.txt"  # written by Orbax once a step (or item) is complete
_ITEMS = ("state", "data")
DAMAGED_DIR = "checkpoints_damaged"


def checksums(state: TrainState, data_iterator=None) -> dict[str, str]:
    """`{leaf path: "crc32 dtype shape"}` for every array of `state`; with `data_iterator` (a
    `data.train_order.StepIterator`), also `"data_iterator/process_<p>-of-<n>"`: the CRC of each process's position
    record (all derivable from the step, so process 0 writes them all), and `"topology"` (processes, devices,
    global batch) for a resume on another one.

    The arrays are replicated, so every process sees the whole of each in its first addressable shard.
    """
    sums = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        array = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
        if isinstance(array, jax.Array) and jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
            array = jax.random.key_data(array)
        array = np.ascontiguousarray(np.asarray(array))
        sums[jax.tree_util.keystr(path)] = f"{zlib.crc32(array.view(np.uint8)):08x} {array.dtype} {list(array.shape)}"
    if data_iterator is not None:
        count = data_iterator.process_count
        for index in range(count):
            record = data_iterator.record_bytes(int(state.step), index)
            sums[_position_key(index, count)] = f"{zlib.crc32(record):08x}"
        sums[TOPOLOGY] = json.dumps(current_topology(data_iterator.global_batch), sort_keys=True)
    return sums


TOPOLOGY = "topology"


def current_topology(global_batch: int) -> dict:
    """The layout a checkpoint records: processes, devices and the global batch."""
    return {"process_count": jax.process_count(), "device_count": jax.device_count(), "global_batch": global_batch}


def _position_key(index: int, count: int) -> str:
    return f"data_iterator/process_{index}-of-{count}"


def _is_array_key(key: str) -> bool:
    return not (key.startswith("data_iterator") or key == TOPOLOGY)


def check_damaged_dir(workdir: str) -> None:
    """One line instead of `FileExistsError` when `checkpoints_damaged` exists as something other than a folder."""
    path = os.path.join(workdir, DAMAGED_DIR)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(
            f"{path} is a file, but damaged checkpoints are set aside in a folder of that name; rename or move "
            f"that file, then rerun"
        )


def _is_ocdbt(state_dir: str) -> bool:
    """Whether an Orbax item directory was written in the OCDBT format (its data under `ocdbt.process_*/`)."""
    try:
        return any(name.startswith("ocdbt.process_") for name in os.listdir(state_dir))
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300]


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int, primary: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.primary = primary
        self.saved_topology = None  # the topology of the step `restore` loaded (None before checkpoints had one)
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(
                    get_metric_fn=lambda metrics: metrics["top1"],
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        drop_event_loop_noise()  # a damaged step's failed read makes Orbax print dozens of these tracebacks

    def latest_step(self) -> int | None:
        """The newest step with its commit markers, or None (not verified: `restore` verifies)."""
        return next((step for step in sorted(self.manager.all_steps(), reverse=True) if self.is_complete(step)), None)

    def is_complete(self, step: int) -> bool:
        """Whether step `step` and its `state` and `data` items were fully committed."""
        root = os.path.join(self.directory, str(step))
        return all(os.path.exists(os.path.join(root, *sub, _COMMIT_MARKER)) for sub in ((), ("state",), ("data",)))

    def all_steps(self) -> list[int]:
        """Steps of all checkpoints in the directory, oldest first."""
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step of the checkpoint with the best eval top-1 (None before the first eval)."""
        return self.manager.best_step()

    def save(
        self, step: int, state: TrainState, data_iterator, eval_metrics: dict | None = None, force: bool = False
    ) -> bool:
        """Starts an async save of `state`, the iterator position and their checksums; returns False if `step` is
        already saved."""
        if step in self.manager.all_steps():
            return False
        sums = checksums(state, data_iterator)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            checksums=ocp.args.JsonSave(sums),
        )
        metrics = {"top1": float(eval_metrics["top1"])} if eval_metrics else None
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(
        self, abstract_state: TrainState, data_iterator, timeout_s: float = 600
    ) -> tuple[int, TrainState] | None:
        """Restores the newest checkpoint that verifies on every process into the shape/sharding of `abstract_state`
        and moves `data_iterator` to its step: `(step, state)`, or None when the directory holds no checkpoint.

        Each process verifies a candidate (commit markers, array checksums, its own data-position record when the
        process count is unchanged), and the verdicts are all-gathered (`distributed.all_gather_json`, at most
        `timeout_s` per exchange), so every process restores the same step. A step that fails on any process is
        skipped by all with one warning naming the process and what was wrong, and process 0 alone moves it to
        `<workdir>/checkpoints_damaged/` (nothing is deleted). Raises UserError if none verifies.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        here = sorted(self.manager.all_steps())
        seen = distributed.all_gather_json("restore/candidates", here, timeout_s)
        candidates = sorted({step for steps in seen for step in steps}, reverse=True)
        damaged = []
        for step in candidates:
            if step in here:
                problem, state = self._try_restore(step, abstract, data_iterator)
            else:
                problem, state = "not listed in this process's view of the checkpoint directory", None
            verdicts = distributed.all_gather_json(f"restore/verify/{step}", problem, timeout_s)
            failed = [(index, what) for index, what in enumerate(verdicts) if what is not None]
            if not failed:
                logging.info("restored checkpoint step %d from %s", step, self.directory)
                self._set_aside(damaged, timeout_s)
                data_iterator.seek(step)
                return step, state
            if len(verdicts) == 1:
                problem = failed[0][1]
            else:
                problem = "; ".join(f"on process {index}: {what}" for index, what in failed)
            logging.warning(
                "checkpoint step %d in %s is damaged (%s); skipping it and trying an older one",
                step,
                self.directory,
                problem,
            )
            damaged.append((step, problem))
        if damaged:
            listed = "; ".join(f"step {step}: {problem}" for step, problem in damaged)
            raise UserError(
                f"no checkpoint in {self.directory} verifies ({listed}). Nothing was deleted. Restore "
                f"them from a backup, or move {self.directory} aside to train from scratch."
            )
        return None

    def _try_restore(self, step: int, abstract, data_iterator) -> tuple[str | None, TrainState | None]:
        """(None, state) if step `step` restores and verifies, else (what was wrong, None)."""
        if not self.is_complete(step):
            return "incomplete: no commit marker", None
        root = os.path.join(self.directory, str(step))
        has_sums = os.path.isdir(os.path.join(root, "checksums"))
        if not has_sums and lists_item(root, "checksums"):  # written with checksums, which are gone: damaged
            return "damaged: its checksums item is missing", None
        state_dir = os.path.join(root, "state")
        if _is_ocdbt(state_dir) and not os.path.exists(os.path.join(state_dir, "manifest.ocdbt")):
            return "damaged: its state manifest (state/manifest.ocdbt) is missing", None  # clearer than tensorstore's
        args = {"state": ocp.args.StandardRestore(abstract)}
        if has_sums:
            args["checksums"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:  # noqa: BLE001 (tensorstore, asyncio, JSON, OS errors: any means unreadable)
            drop_unawaited_warnings()
            return f"cannot be read: {_first_line(error)}", None
        state = restored["state"]
        if not has_sums:
            logging.warning("checkpoint step %d in %s predates checksums; loading it unverified", step, self.directory)
            return None, state
        saved = dict(restored["checksums"])
        self.saved_topology = json.loads(saved.get(TOPOLOGY, "null"))
        now = checksums(state)
        wrong = sorted(key for key in set(saved) | set(now) if _is_array_key(key) and saved.get(key) != now.get(key))
        wrong += self._check_position(root, saved, data_iterator)
        if wrong:
            return (
                f"checksum mismatch in {len(wrong)} entr{'y' if len(wrong) == 1 else 'ies'}: {', '.join(wrong[:3])}",
                None,
            )
        return None, state

    def _check_position(self, root: str, saved: dict, data_iterator) -> list[str]:
        """The checksum entries of this process's data-position record that fail ([] if it verifies, or if the
        checkpoint was written by another number of processes: then the position is derived from the step alone)."""
        key = _position_key(jax.process_index(), jax.process_count())
        if "data_iterator" in saved:  # written before positions were records: the step alone gives the position
            logging.warning("checkpoint %s keeps a grain iterator state; the data position comes from its step", root)
            return []
        if key not in saved:
            return []
        path = os.path.join(root, "data", f"{key.split('/', 1)[1]}.json")
        try:
            with open(path, "rb") as f:
                record = f.read()
        except OSError:
            return [key]
        return [] if f"{zlib.crc32(record):08x}" == saved[key] else [key]

    def _set_aside(self, damaged: list[tuple[int, str]], timeout_s: float = 600) -> None:
        """Moves damaged steps to `<workdir>/checkpoints_damaged/<step>-<time>/` with a note of what was wrong
        (process 0 only; the others wait for it, then all reload the directory)."""
        if not damaged:
            return
        if not self.primary:
            distributed.barrier("restore/set-aside", timeout_s)
            self.manager.reload()
            return
        check_damaged_dir(self.workdir)
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        for step, problem in damaged:
            target = os.path.join(self.workdir, DAMAGED_DIR, f"{step}-{stamp}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
            with open(os.path.join(target, "DAMAGED.txt"), "w") as f:
                f.write(f"step {step} failed verification on {stamp}: {problem}\n")
            logging.warning("moved damaged checkpoint step %d to %s", step, target)
        distributed.barrier("restore/set-aside", timeout_s)
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
