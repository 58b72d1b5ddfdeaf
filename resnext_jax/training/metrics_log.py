"""What the user sees: a live progress bar, one line per epoch, `metrics.jsonl` and TensorBoard event files.

Only process 0 writes; the others get a logger whose methods do nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import time

import tqdm

from resnext_jax.run_files import read_metrics


class MetricsLogger:
    """Appends one JSON object per logged point to `<workdir>/metrics.jsonl` and mirrors it to TensorBoard.

    Every record has `step` and `split` ('train', 'eval' or 'eval_ema') plus the metric values, e.g.
    `{"step": 100, "split": "eval", "epoch": 2, "loss": 0.31, "top1": 0.95, "top5": 0.99}`.
    """

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, trackers=None):
        """`trackers`: a `training.trackers.Trackers` (W&B, MLflow) that every record is also sent to."""
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb, self.trackers = None, trackers
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> None:
        """Records `metrics` (scalars) for `split` at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if self._tb is not None and key not in ("step", "split") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, int(step))
        if self.trackers is not None:
            self.trackers.log(int(step), split, {k: v for k, v in record.items() if k not in ("step", "split")})

    def truncate_after(self, step: int) -> str | None:
        """Sets aside the records past `step` (written after the checkpoint a resumed run restarts from, or all of
        them when it restarts from scratch), so that the resumed run logs each step once, and drops a torn last line.

        History is never deleted: the whole file as it was is first copied to `metrics.jsonl.<time>` (the eval
        records that `which="best"` needs for checkpoints moved aside stay there), with a warning naming it.
        Returns that path, or None when nothing was past `step`.
        """
        if not self.enabled or not os.path.exists(self.path):
            return None
        records = read_metrics(os.path.dirname(self.path))
        kept = [record for record in records if record["step"] <= step]
        backup = None
        if len(kept) < len(records):
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
            backup = f"{self.path}.{stamp}"
            suffix = 1
            while os.path.exists(backup):
                backup, suffix = f"{self.path}.{stamp}-{suffix}", suffix + 1
            shutil.copyfile(self.path, backup)
            logging.warning(
                "restarting at step %d: %d records of %s past it are set aside in %s",
                step,
                len(records) - len(kept),
                self.path,
                backup,
            )
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
        os.replace(self.path + ".tmp", self.path)
        return backup

    def close(self) -> None:
        """Flushes TensorBoard and ends the trackers' runs."""
        if self._tb is not None:
            self._tb.close()
        if self.trackers is not None:
            self.trackers.close()


def _duration(seconds: float) -> str:
    """'1:02:03' or '2:03' (h:mm:ss or m:ss)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    return round(value, 6) if isinstance(value, float) else value


class Progress:
    """A tqdm bar over optimizer steps (loss, img/s, ETA) plus one summary line per epoch, on process 0 only.

    `show_bar=False` (config.progress_bar) keeps the epoch lines but hides the bar. Without a terminal (stderr
    piped to a file or a cluster's log), the bar's carriage-return frames would fill the log: it becomes one plain
    line at most every `line_every_s` seconds instead (`periodic`; default: when stderr is not a terminal).
    Every line (not the bar) is also appended to `log_path` (the workdir's train.log), so the run's log survives
    its terminal.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int,
        global_batch: int,
        primary: bool,
        show_bar: bool,
        show_top5: bool = True,
        periodic: bool | None = None,
        line_every_s: float = 30.0,
        log_path: str | None = None,
    ):
        self.primary, self.show_top5 = primary, show_top5  # top-5 says nothing with 5 classes or fewer
        self.global_batch = global_batch
        if periodic is None:
            periodic = not sys.stderr.isatty()
        self.periodic = bool(primary and show_bar and periodic)
        self.total_steps, self.line_every_s = total_steps, line_every_s
        self.log_path = log_path if primary else None  # every written line is appended there too
        self._bar = tqdm.tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (primary and show_bar) or self.periodic,
            file=sys.stderr,
            desc="train",
        )
        self._last_time, self._last_step = time.perf_counter(), initial_step
        self._line_time, self._line_step = self._last_time, initial_step

    def update(self, step: int, metrics: dict | None = None) -> None:
        """Advances the bar to `step`; with `metrics` (the mean of the steps since the last call with them),
        refreshes loss and img/s, or, without a terminal, writes a periodic line."""
        if self.periodic:
            if metrics is not None:
                self._periodic_line(step, metrics)
            return
        if self._bar.disable:
            return
        self._bar.update(step - self._bar.n)
        if metrics is not None:
            now = time.perf_counter()
            rate = (step - self._last_step) * self.global_batch / max(now - self._last_time, 1e-9)
            self._last_time, self._last_step = now, step
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{rate:.0f}", refresh=False)

    def _periodic_line(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        window = step - self._last_step
        self._last_time, self._last_step = now, step
        if now - self._line_time < self.line_every_s and step < self.total_steps:
            return
        steps, seconds = step - self._line_step, max(now - self._line_time, 1e-9)
        self._line_time, self._line_step = now, step
        remaining = (self.total_steps - step) * seconds / max(steps, 1)
        self.write(
            f"step {step}/{self.total_steps} ({step / max(self.total_steps, 1):.0%}) | train loss "
            f"{metrics['loss']:.4f} (mean of the last {window} steps) | {steps * self.global_batch / seconds:.0f} "
            f"img/s | ETA {_duration(remaining)}"
        )

    def epoch_line(self, epoch: int, num_epochs: int, train: dict, seconds: float, evals: dict[str, dict]) -> None:
        """Prints one summary line: the epoch's mean train loss and top-1 (over all of its steps), epoch time, and
        each eval's loss, top-1 and top-5 (over the whole eval split)."""
        parts = [
            f"epoch {epoch}/{num_epochs}",
            f"train (epoch mean) loss {train['loss']:.4f} top1 {train['top1']:.2%}",
            f"{seconds:.1f}s",
        ]
        for split, metrics in evals.items():
            top5 = f" top5 {metrics['top5']:.2%}" if self.show_top5 else ""
            parts.append(f"{split} loss {metrics['loss']:.4f} top1 {metrics['top1']:.2%}{top5}")
        self.write(" | ".join(parts))

    def write(self, text: str) -> None:
        """Prints `text` on process 0 without breaking the bar."""
        if self.primary:
            tqdm.tqdm.write(text, file=sys.stderr)
        if self.log_path is not None:
            stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
            try:
                with open(self.log_path, "a") as f:
                    f.write(f"{stamp} {text}\n")
            except OSError as error:  # the log file is a copy: losing it must not stop training
                logging.warning("cannot append to %s (%s); the log goes to stderr only", self.log_path, error)
                self.log_path = None

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()
