"""Multi-host path on one machine: 2 CPU processes x 2 devices talking through gloo, started by launch/local.py with
the explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, as a cluster launcher would."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    # The local launcher, as the docs run it: process 0 on the console, process 1 in <workdir>/launch/.
    done = subprocess.run(
        [sys.executable, "launch/local.py", "--processes", "2", "--devices", "2", "--"]
        + ["--config", "configs/quickstart.py", "--workdir", str(tmp_path)]
        + ["--config.num_epochs=1", "--config.progress_bar=False"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = done.stdout + done.stderr
    other = (tmp_path / "launch" / "process_1.log").read_text()
    assert done.returncode == 0, console[-3000:] + other[-3000:]
    assert "4 device(s), 2 process(es)" in console
    assert "epoch 1/1" in console and "epoch 1/1" not in other  # only process 0 reports
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["count"] == 360  # each eval example counted once across processes
    assert evals[0]["top1"] > 0.5
    # Each process's position record, and the slowest and fastest process at each log step.
    data_state = os.listdir(tmp_path / "checkpoints" / str(evals[0]["step"]) / "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_state)
    train = [r for r in records if r["split"] == "train"]
    assert all(0 < r["host_step_s_min"] <= r["host_step_s_max"] and 0 <= r["host_data_wait_max"] < 1 for r in train)
