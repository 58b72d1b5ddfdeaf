"""W&B (offline) and MLflow (a local SQLite store) as trackers of a real run, read back through their own APIs."""

import glob
import json
import logging
import os
import struct

import pytest
from test_training import tiny_config

from resnext_jax.training import read_metrics, train_and_evaluate
from resnext_jax.training import trackers as trackers_lib
from resnext_jax.training.config import ConfigError, validate_config


def wandb_records(path):
    """The records of a W&B run file (`run-ID.wandb`), parsed with wandb's own protobufs. The file is W&B's
    LevelDB-style log: a 7-byte header (':W&B', 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a
    7-byte header (CRC-32C, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A run with all three trackers, stopped at step 10 and resumed to the end (22 steps, eval at 22)."""
    root = tmp_path_factory.mktemp("tracked")
    environment = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_PROJECT": "resnext-jax-tests",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "MLFLOW_EXPERIMENT_NAME": "tests",
    }
    saved = {key: os.environ.get(key) for key in environment}
    cwd = os.getcwd()
    os.environ.update(environment)
    os.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the test's folder
    try:
        config = tiny_config(num_epochs=1, trackers=("tensorboard", "wandb", "mlflow"), write_report=True)
        workdir = str(root / "run")
        train_and_evaluate(config, workdir, stop_at_step=10)
        first_ids = json.load(open(os.path.join(workdir, "trackers.json")))
        train_and_evaluate(config, workdir)
        yield workdir, first_ids, environment["MLFLOW_TRACKING_URI"]
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow  # a training run stopped and resumed
def test_wandb_offline_run_holds_metrics_config_and_report_and_resumes_the_same_run(tracked_run):
    workdir, first_ids, _ = tracked_run
    ids = json.load(open(os.path.join(workdir, "trackers.json")))
    assert ids["wandb"] == first_ids["wandb"]  # the resumed run continued the same W&B run
    files = sorted(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{ids['wandb']}", "*.wandb")))
    assert len(files) == 2  # one per process run, both of the same run id
    records = [record for path in files for record in wandb_records(path)]
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    logged = {(r["step"], f"{r['split']}/{key}"): value for r in read_metrics(workdir) for key, value in r.items()}
    assert sorted(history) == [10, 20, 22]
    for step, items in history.items():
        for key, value in items.items():
            if not key.startswith("_"):
                assert value == pytest.approx(logged[(step, key)], rel=1e-6), (step, key)
    assert history[22]["eval/top1"] == pytest.approx(logged[(22, "eval/top1")])
    [run] = [record.run for record in records if record.WhichOneof("record_type") == "run"][:1]
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    assert config["model"] == "resnext50_32x4d" and config["trackers"] == ["tensorboard", "wandb", "mlflow"]
    artifacts = [record.artifact for record in records if record.WhichOneof("record_type") == "artifact"]
    assert [a.name for a in artifacts] == ["report"]
    paths = {entry.path for entry in artifacts[0].manifest.contents}
    assert {"report.md", "report.json", "confusion_matrix.png", "training_curves.png"} <= paths


@pytest.mark.slow  # shares the run above
def test_mlflow_sqlite_store_holds_metrics_config_and_report_and_resumes_the_same_run(tracked_run):
    from mlflow.tracking import MlflowClient

    workdir, first_ids, uri = tracked_run
    ids = json.load(open(os.path.join(workdir, "trackers.json")))
    assert ids["mlflow"] == first_ids["mlflow"]
    client = MlflowClient(uri)
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    records = read_metrics(workdir)
    for split, key in (("train", "loss"), ("train", "learning_rate"), ("eval", "top1"), ("eval", "loss")):
        history = client.get_metric_history(ids["mlflow"], f"{split}/{key}")
        expected = [(r["step"], r[key]) for r in records if r["split"] == split]
        history = sorted(history, key=lambda m: m.step)
        assert [m.step for m in history] == [step for step, _ in expected], key
        assert [m.value for m in history] == pytest.approx([value for _, value in expected], rel=1e-6), key
    assert run.data.params["model"] == "resnext50_32x4d" and run.data.params["model_kwargs.num_filters"] == "8"
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert artifacts == {"config.json", "report"}
    report = {os.path.basename(a.path) for a in client.list_artifacts(ids["mlflow"], "report")}
    assert {"report.md", "report.json", "reliability.png", "training_curves.png"} <= report
    config = json.load(open(client.download_artifacts(ids["mlflow"], "config.json", str(os.path.dirname(workdir)))))
    assert config == json.load(open(os.path.join(workdir, "config.json")))


def test_a_failing_tracker_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    calls = []

    class Flaky:
        def __init__(self, workdir, config, saved_id):
            self.id = "flaky-1"

        def log(self, step, metrics):
            calls.append((step, metrics))
            if step >= 20:
                raise ConnectionError("the tracking server went away\nsecond line")

        def close(self):
            calls.append("closed")

    class Missing:
        def __init__(self, workdir, config, saved_id):
            raise ModuleNotFoundError("No module named 'wandb'")

    monkeypatch.setitem(trackers_lib._BACKENDS, "mlflow", Flaky)
    monkeypatch.setitem(trackers_lib._BACKENDS, "wandb", Missing)
    with caplog.at_level(logging.WARNING):
        trackers = trackers_lib.Trackers(("wandb", "mlflow"), str(tmp_path), {"model": "x"})
        for step in (10, 20, 30):
            trackers.log(step, "train", {"loss": 1.0 / step, "name": "not a number"})
        trackers.close()
    assert calls == [(10, {"train/loss": 0.1}), (20, {"train/loss": 0.05})]  # dropped after its failure
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("tracker wandb could not start (ModuleNotFoundError: No module named 'wandb')")
    assert "tracker mlflow failed to log metrics (ConnectionError: the tracking server went away)" in warnings[1]
    assert json.load(open(tmp_path / "trackers.json")) == {"mlflow": "flaky-1"}


def test_unknown_tracker_names_the_choices():
    with pytest.raises(ConfigError, match=r"config.trackers names \['neptune'\]; use any of \('tensorboard'"):
        validate_config(tiny_config(trackers=("tensorboard", "neptune")))
