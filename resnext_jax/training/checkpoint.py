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

from resnext_jax.errors import UserError, drop_event_loop_noise
from resnext_jax.training.step import TrainState

_COMMIT_MARKER = "commit_success.txt"  # written by Orbax once a step (or item) is complete
_ITEMS = ("state", "data")
DAMAGED_DIR = "checkpoints_damaged"


def checksums(state: TrainState, iterator_state) -> dict[str, str]:
    """`{leaf path: "crc32 dtype shape"}` for every array of `state`, plus `"data_iterator"` for the iterator state.

    The arrays are replicated, so every process sees the whole of each in its first addressable shard.
    """
    sums = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        array = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
        if isinstance(array, jax.Array) and jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
            array = jax.random.key_data(array)
        array = np.ascontiguousarray(np.asarray(array))
        sums[jax.tree_util.keystr(path)] = f"{zlib.crc32(array.view(np.uint8)):08x} {array.dtype} {list(array.shape)}"
    if not isinstance(iterator_state, bytes):  # grain gives bytes; other iterators a JSON-able state
        iterator_state = json.dumps(iterator_state, sort_keys=True, default=str).encode()
    sums["data_iterator"] = f"{zlib.crc32(iterator_state):08x}"
    return sums


def lists_item(step_dir: str, item: str) -> bool:
    """Whether Orbax's step metadata names `item`: the step was written with it, so its absence is damage (a
    step written before that item existed does not name it)."""
    try:
        with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
            return item in (json.load(f).get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
        return False


def check_damaged_dir(workdir: str) -> None:
    """One line instead of `FileExistsError` when `checkpoints_damaged` exists as something other than a folder."""
    path = os.path.join(workdir, DAMAGED_DIR)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(
            f"{path} is a file, but damaged checkpoints are set aside in a folder of that name; rename or move "
            f"that file, then rerun"
        )


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:300]


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int, primary: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.primary = primary
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
        sums = checksums(state, data_iterator.get_state())
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            checksums=ocp.args.JsonSave(sums),
        )
        metrics = {"top1": float(eval_metrics["top1"])} if eval_metrics else None
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, abstract_state: TrainState, data_iterator) -> tuple[int, TrainState] | None:
        """Restores the newest checkpoint that verifies into the shape/sharding of `abstract_state` and moves
        `data_iterator` to its position: `(step, state)`, or None when the directory holds no checkpoint.

        A step that is incomplete, cannot be read or fails its checksums is skipped with one warning naming it and
        what was wrong, and moved to `<workdir>/checkpoints_damaged/`. Raises UserError if none verifies.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem, state = self._try_restore(step, abstract, data_iterator)
            if problem is None:
                logging.info("restored checkpoint step %d from %s", step, self.directory)
                self._set_aside(damaged)
                return step, state
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
        args = {"state": ocp.args.StandardRestore(abstract), "data": grain.checkpoint.CheckpointRestore(data_iterator)}
        if has_sums:
            args["checksums"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:  # noqa: BLE001 (tensorstore, asyncio, JSON, OS errors: any means unreadable)
            return f"cannot be read: {_first_line(error)}", None
        state = restored["state"]
        if not has_sums:
            logging.warning("checkpoint step %d in %s predates checksums; loading it unverified", step, self.directory)
            return None, state
        saved = dict(restored["checksums"])
        now = checksums(state, data_iterator.get_state())
        wrong = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
        if wrong:
            return (
                f"checksum mismatch in {len(wrong)} entr{'y' if len(wrong) == 1 else 'ies'}: {', '.join(wrong[:3])}",
                None,
            )
        return None, state

    def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Moves damaged steps to `<workdir>/checkpoints_damaged/<step>-<time>/` with a note of what was wrong."""
        if not damaged or not self.primary:
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
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
