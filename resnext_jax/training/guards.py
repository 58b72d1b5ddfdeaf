"""The training loop's guards: a signal that asks it to stop, a loss that went non-finite, a disk that is full or
read-only. Each ends a run cleanly: the step finishes and saves, or a one-line error names the fix."""

from __future__ import annotations

import errno
import logging
import math
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnext_jax.errors import UserError, disk_error
from resnext_jax.training.checkpoint import Checkpointer


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (finish the step, save, exit 0)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        logging.warning(
            "received %s: finishing this step, saving a checkpoint and exiting", signal.Signals(signum).name
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, sync_point: bool) -> bool:
        """Whether to stop now. With several processes the flags are all-gathered only at `sync_point` steps
        (log steps and epoch ends, the same on every process), so all stop at the same step."""
        if jax.process_count() == 1:
            return self.requested
        return sync_point and bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class TrainingDiverged(UserError, FloatingPointError):
    """The loss went non-finite; the message gives the command that resumes with a lower learning rate."""


def check_finite(metrics: dict, step: int, checkpointer: Checkpointer, learning_rate: float) -> None:
    if not math.isfinite(metrics["loss"]):
        checkpointer.wait()
        last = checkpointer.latest_step()
        lower = f"{learning_rate / 4:.3g}"
        if last is None:
            where, how = (
                "No checkpoint was saved yet",
                f"Rerun with --config.learning_rate={lower} (and a new "
                f"--workdir, or the same one with --allow_changes), a longer warmup_epochs or a positive "
                f"grad_clip_norm",
            )
        else:
            where = f"The last good checkpoint (step {last}) in {checkpointer.directory} is intact"
            how = (
                f"To resume from it with a lower learning rate, rerun the same command with "
                f"--config.learning_rate={lower} --allow_changes (longer warmup_epochs or a positive "
                f"grad_clip_norm can change the same way)"
            )
        raise TrainingDiverged(f"training diverged: the loss is {metrics['loss']} at step {step}. {where}. {how}.")


def disk_error_in(error: BaseException, workdir: str) -> UserError | None:
    """The one-line UserError for a full or read-only disk found anywhere in `error`'s chain, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            converted = disk_error(error, workdir, "checkpoints and logs")
            if isinstance(converted, UserError):
                return converted
        for text, code in (("No space left on device", errno.ENOSPC), ("Read-only file system", errno.EROFS)):
            if text in str(error):  # tensorstore reports the OS error as text
                return disk_error(OSError(code, text), workdir, "checkpoints and logs")
        error = error.__cause__ or error.__context__
    return None
