"""Multi-host faults on one machine (CPU processes over gloo, started by launch/local.py): a step damaged on one
process only. Dead peers: test_multihost_chaos.py. docs/training.md "Multi-host" lists each failure with its test;
the helpers here start and stop the other multi-host tests' runs."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from launch import local  # noqa: E402

# Multi-process runs with bounded waits (peer timeouts): under pytest-xdist they run with no other test beside them.
pytestmark = pytest.mark.alone

PEER_TIMEOUT_S = 20
# The quick start, one epoch (59 steps of a global batch of 24), checkpoints every 10 steps.
ARGS = [
    "--config",
    "configs/quickstart.py",
    "--config.num_epochs=1",
    "--config.batch_size=24",
    "--config.eval_batch_size=120",
    "--config.checkpoint_every_steps=10",
    "--config.progress_bar=False",
    "--config.write_report=False",
    f"--config.peer_timeout_s={PEER_TIMEOUT_S}",
]
LOST_LINE = "Rerun the same command on every host to resume from the last checkpoint."


def launch(workdir, processes, devices, *extra, wait=True, timeout_s=420):
    """Starts the run on `processes` x `devices`; with `wait`, returns [(exit code, output)] per process."""
    logs = [open(os.path.join(str(workdir) + f".p{index}.log"), "w+") for index in range(processes)]
    started = local.start(
        [*ARGS, "--workdir", str(workdir), *extra],
        processes,
        devices,
        stdout=lambda index: logs[index],
        stderr=subprocess.STDOUT,
    )
    if not wait:
        return started, logs
    return finish(started, logs, timeout_s)


def finish(started, logs, timeout_s=420):
    """Waits for every process (killing all on timeout); returns [(exit code, output)]."""
    deadline = time.monotonic() + timeout_s
    try:
        for process in started:
            process.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        local.stop(started)
    results = []
    for process, log in zip(started, logs):
        log.seek(0)
        results.append((process.returncode, log.read()))
        log.close()
    return results


def checksums(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata")) as f:
        return json.load(f)


def wait_for(predicate, started, timeout_s=300, interval_s=0.2):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        assert all(p.poll() is None for p in started), "a process ended early"
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A finished 2 x 1 run: checkpoints 50 and 59."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    results = launch(workdir, 2, 1)
    for code, output in results:
        assert code == 0, output[-3000:]
    return str(workdir)


@pytest.mark.slow
def test_a_step_damaged_on_one_process_is_skipped_by_all(two_process_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(two_process_run, workdir)
    original = checksums(workdir, 59)
    record = os.path.join(workdir, "checkpoints", "59", "data", "process_1-of-2.json")
    with open(record) as f:
        position = json.load(f)
    position["step"] -= 1  # valid JSON, and wrong: only process 1 can tell
    with open(record, "w") as f:
        json.dump(position, f, sort_keys=True)

    results = launch(workdir, 2, 1)
    for code, output in results:
        assert code == 0, output[-3000:]
        # Every process skips step 59 for the same reason, found on process 1 alone.
        assert "checkpoint step 59" in output and "on process 1: checksum mismatch" in output, output[-3000:]
    assert "resuming at step 50" in results[0][1]
    # Set aside once, by process 0; and retrained from step 50 to exactly the same state.
    (kept,) = glob.glob(os.path.join(workdir, "checkpoints_damaged", "59-*"))
    assert "process 1" in open(os.path.join(kept, "DAMAGED.txt")).read()
    assert checksums(workdir, 59) == original
