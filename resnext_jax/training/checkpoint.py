"""Checkpoints with Orbax's `CheckpointManager`: async saves of the train state and the data-iterator position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Orbax writes each step into a temporary directory and
renames it only once complete, so a save interrupted mid-write is never listed (and is cleaned up at the next
start). The latest `keep` checkpoints are kept, plus the one with the best eval top-1.
"""
from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from resnext_jax.training.step import TrainState

_COMMIT_MARKER = "commit_success.txt"  # written by Orbax once a step (or item) is complete


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda metrics: metrics["top1"], reverse=False, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None.

        Orbax writes into a temporary directory and renames it when done; on top of that, a step counts only if
        it and both of its items carry Orbax's commit marker, so a half-copied or half-written step is skipped
        (with a warning) in favour of the previous complete one.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            if self.is_complete(step):
                return step
            logging.warning("checkpoint step %d in %s is incomplete (no commit marker); skipping it", step,
                            self.directory)
        return None

    def is_complete(self, step: int) -> bool:
        """Whether step `step` and its `state` and `data` items were fully committed."""
        root = os.path.join(self.directory, str(step))
        return all(os.path.exists(os.path.join(root, *sub, _COMMIT_MARKER)) for sub in ((), ("state",), ("data",)))

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The step of the checkpoint with the best eval top-1 (None before the first eval)."""
        return self.manager.best_step()

    def save(self, step: int, state: TrainState, data_iterator, eval_metrics: dict | None = None,
             force: bool = False) -> bool:
        """Starts an async save of `state` and the iterator position; returns False if `step` is already saved."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        metrics = {"top1": float(eval_metrics["top1"])} if eval_metrics else None
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, abstract_state: TrainState, data_iterator, step: int | None = None) -> TrainState:
        """Restores the checkpoint at `step` (default: latest) into the shape/sharding of `abstract_state` and
        moves `data_iterator` to the saved position."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return restored["state"]

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
