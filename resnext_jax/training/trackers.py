"""Experiment trackers besides metrics.jsonl: TensorBoard (the default), Weights & Biases and MLflow.

    --config.trackers='("tensorboard", "wandb", "mlflow")'      # pip install 'resnext-jax[track]'

Each logs every metrics record (as `split/name`, e.g. `eval/top1`, against the step), the resolved config and, at
the end, the report's files as artifacts; only process 0 logs. The tracked run's id is kept in
`<workdir>/trackers.json`, so a resumed run continues the same W&B run and MLflow run. Where they write follows each
library's own settings: W&B's `WANDB_PROJECT` (default "resnext-jax"), `WANDB_MODE=offline` (no network; `wandb
sync` uploads later), `WANDB_DIR` (default: the workdir); MLflow's `MLFLOW_TRACKING_URI` (e.g.
`sqlite:///runs/mlflow.db`; MLflow 3's default is `mlflow.db` in the current directory, its artifacts in ./mlruns)
and `MLFLOW_EXPERIMENT_NAME` (default "resnext-jax"). A tracker that fails (not installed, no network, a full disk)
costs one warning and is dropped; the run goes on.
"""

from __future__ import annotations

import json
import logging
import os

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
PROJECT = "resnext-jax"
log = logging.getLogger("resnext_jax.training")


def tracker_names(value) -> tuple[str, ...]:
    """`config.trackers` as a tuple of names (a single name given as a string counts as one)."""
    return (value,) if isinstance(value, str) else tuple(value)


class _WandB:
    def __init__(self, workdir: str, config: dict, saved_id: str | None):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=os.path.basename(workdir),
            dir=os.environ.get("WANDB_DIR", workdir),
            config=config,
            id=saved_id,
            resume="allow" if saved_id else None,
            reinit="create_new",
        )
        self.id = self.run.id

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def log_files(self, directory: str, name: str) -> None:
        artifact = self._wandb.Artifact(name, type="report")
        artifact.add_dir(directory)
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, workdir: str, config: dict, saved_id: str | None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, as mlflow itself reads it
        if saved_id:
            self.id = saved_id
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.id = self.client.create_run(experiment_id, run_name=os.path.basename(workdir)).info.run_id
            flat = _flatten(config)
            for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
                from mlflow.entities import Param

                params = [Param(key, str(value)[:500]) for key, value in list(flat.items())[start : start + 100]]
                self.client.log_batch(self.id, params=params)
            self.client.log_dict(self.id, config, "config.json")
        self.client.update_run(self.id, status="RUNNING")

    def log(self, step: int, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def log_files(self, directory: str, name: str) -> None:
        self.client.log_artifacts(self.id, directory, name)

    def close(self) -> None:
        self.client.set_terminated(self.id)


_BACKENDS = {"wandb": _WandB, "mlflow": _MLflow}


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """The configured W&B and MLflow runs of one training run (TensorBoard is `MetricsLogger`'s own writer).

    Every call is guarded: a tracker that raises is warned about once and dropped, never ending the run.
    """

    def __init__(self, names, workdir: str, config: dict, enabled: bool = True):
        self.workdir, self.active = workdir, {}
        if not enabled:
            return
        path = os.path.join(workdir, IDS_FILE)
        saved = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, json.JSONDecodeError) as error:
                log.warning("%s is unreadable (%s); starting new tracked runs", path, error)
        for name in names:
            if name not in _BACKENDS:
                continue
            try:
                self.active[name] = _BACKENDS[name](workdir, config, saved.get(name))
            except Exception as error:  # noqa: BLE001  not installed, no network, no credentials: all a warning
                self._warn(name, "could not start", error)
        if self.active:
            ids = {**saved, **{name: tracker.id for name, tracker in self.active.items()}}
            with open(path, "w") as f:
                json.dump(ids, f, indent=1)

    def _warn(self, name: str, doing: str, error: Exception) -> None:
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning(
            "tracker %s %s (%s: %s); the run goes on without it (metrics.jsonl and TensorBoard still log)",
            name,
            doing,
            type(error).__name__,
            message[:200],
        )

    def _each(self, doing: str, call) -> None:
        for name, tracker in list(self.active.items()):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001  a tracker's failure must never end the run
                self._warn(name, doing, error)
                del self.active[name]

    def log(self, step: int, split: str, metrics: dict) -> None:
        """Logs the numeric `metrics` of `split` at `step` as `split/name`."""
        values = {f"{split}/{key}": float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
        self._each("failed to log metrics", lambda tracker: tracker.log(step, values))

    def log_files(self, directory: str) -> None:
        """Uploads (or, offline, stages) every file of `directory` (the report) as an artifact named after it."""
        name = os.path.basename(os.path.normpath(directory))
        self._each("failed to log the report files", lambda tracker: tracker.log_files(directory, name))

    def close(self) -> None:
        self._each("failed to close", lambda tracker: tracker.close())
        self.active = {}
