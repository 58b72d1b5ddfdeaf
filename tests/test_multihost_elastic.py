"""Elastic resume: one workdir trained on 2 x 2, then 1 x 2, then 3 x 1 processes x devices (global batch 24), each
leg stopped by SIGTERM mid-epoch; and a device count that does not divide the global batch is one error line."""

import json
import os
import signal
import subprocess
import sys

import pytest
from test_multihost_faults import ARGS, ROOT, finish, launch, wait_for

from launch import local

# Multi-process runs with bounded waits (peer timeouts): under pytest-xdist they run with no other test beside them.
pytestmark = pytest.mark.alone


def _stop_when(workdir, step, started, victims):
    """SIGTERM to `victims` once checkpoint `step` exists (a preemption: the others learn of it at the next log
    step), then waits for all; returns [(exit code, output)]."""
    wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(step))), started[0])
    for index in victims:
        os.kill(started[0][index].pid, signal.SIGTERM)
    return finish(*started)


def _stopped_at(output: str) -> int:
    return int(output.split("stopping at step ")[1].split(":")[0])


@pytest.mark.slow
def test_a_run_resumes_on_other_process_and_device_counts(tmp_path):
    workdir = str(tmp_path / "run")
    epochs = ["--config.num_epochs=5"]  # 295 steps of 59 per epoch
    # 2 x 2 until the first epoch is saved; SIGTERM to process 1 only: both save the same step and exit 0.
    results = _stop_when(workdir, 59, launch(workdir, 2, 2, *epochs, wait=False), victims=[1])
    for code, output in results:
        assert code == 0, output[-3000:]
    first = _stopped_at(results[0][1])
    assert 59 < first < 118 and first % 10 == 0  # at a log step (where the stop flags are all-gathered)
    # 1 x 2 (one process, no distributed runtime), until step 236 is saved.
    ((code, output),) = _stop_when(workdir, 236, launch(workdir, 1, 2, *epochs, wait=False), victims=[0])
    assert code == 0, output[-3000:]
    assert f"resuming at step {first}" in output, output[-3000:]
    assert "2 process(es) with 4 device(s) -> 1 with 2" in output, output[-3000:]
    stopped = _stopped_at(output)
    # 3 x 1 to the end.
    results = launch(workdir, 3, 1, *epochs)
    for code, output in results:
        assert code == 0, output[-3000:]
    assert f"resuming at step {stopped}" in results[0][1]
    assert "1 process(es) with 2 device(s) -> 3 with 3" in results[0][1]

    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 295  # each step logged once
    final = [r for r in records if r["split"] == "eval"][-1]
    assert final["step"] == 295 and final["count"] == 360 and final["top1"] >= 0.97, final
    changes = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
    topologies = [(c["step"], c["changes"]["topology"]) for c in changes if "topology" in c["changes"]]
    assert [(step, t["from"]["process_count"], t["to"]["process_count"]) for step, t in topologies] == [
        (first, 2, 1),
        (stopped, 1, 3),
    ]

    # 5 devices do not divide the global batch of 24: one line that lists the device counts that do.
    env = local.process_env(0, 1, 5, local.free_port())
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key)
    done = subprocess.run(
        [sys.executable, "-m", "train", *ARGS, *epochs, "--workdir", workdir],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not divisible by 5 devices" in errors[0], done.stderr[-2000:]
    assert "device count that divides it: 1, 2, 3, 4, 6, 8, 12, 24" in errors[0]
