"""Chaos on 3 processes of 1 device (the quick start, global batch 24, one epoch): SIGTERM to process 2 alone, then
three kill -9 at random moments (one inside a save), of each process once in a random order (the coordinator
included), each followed by a relaunch of the same command. The survivors of each kill exit within peer_timeout_s
with one line and nothing else from the runtime, and the run ends with the final checkpoint and eval metrics of an
uninterrupted 3-process run, bit for bit."""

import json
import os
import random
import signal
import time

import pytest
from test_multihost_faults import LOST_LINE, PEER_TIMEOUT_S, checksums, finish, launch, wait_for

# Multi-process runs with bounded waits (peer timeouts): under pytest-xdist they run with no other test beside them.
pytestmark = pytest.mark.alone

STEPS = 59


def _records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _final_eval(workdir):
    (final,) = [r for r in _records(workdir) if r["split"] == "eval"]
    return final


def _checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []


def _temporaries(workdir) -> set[str]:
    """Orbax's temporary directories: the steps being written (or left by a killed save)."""
    directory = os.path.join(workdir, "checkpoints")
    return {name for name in os.listdir(directory) if "tmp" in name} if os.path.isdir(directory) else set()


@pytest.mark.slow
def test_three_processes_survive_preemption_and_kills_bit_identical(tmp_path):
    rng = random.Random(28)
    reference = str(tmp_path / "reference")
    for code, output in launch(reference, 3, 1):
        assert code == 0, output[-3000:]

    workdir = str(tmp_path / "chaos")
    # Preemption of one host: SIGTERM to process 2 only. All save the same step and exit 0.
    started = launch(workdir, 3, 1, wait=False)
    wait_for(lambda: 10 in _checkpoint_steps(workdir), started[0])
    os.kill(started[0][2].pid, signal.SIGTERM)
    results = finish(*started)
    for code, output in results:
        assert code == 0, output[-3000:]
    stopped = int(results[0][1].split("stopping at step ")[1].split(":")[0])
    data = os.path.join(workdir, "checkpoints", str(stopped), "data")
    records = [name for name in os.listdir(data) if name.endswith(".json")]
    assert sorted(records) == [f"process_{i}-of-3.json" for i in range(3)]  # every process saved that step

    # Three kill -9 rounds: after a random checkpoint plus a random delay, or inside a save.
    victims = rng.sample(range(3), 3)
    for round_, moment in enumerate(("after", "inside a save", "after")):
        newest, stale = max(_checkpoint_steps(workdir)), _temporaries(workdir)
        started = launch(workdir, 3, 1, wait=False)
        victim = victims[round_]
        if moment == "inside a save":
            # A save takes a fraction of a second here; should the polling miss it, the kill follows its commit.
            wait_for(
                lambda: _temporaries(workdir) - stale or max(_checkpoint_steps(workdir)) > newest,
                started[0],
                300,
                interval_s=0.005,
            )
        else:
            wait_for(lambda: max(_checkpoint_steps(workdir)) > newest, started[0], 300)
            time.sleep(rng.uniform(0, 2))
        os.kill(started[0][victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        for process in started[0]:
            process.wait(timeout=PEER_TIMEOUT_S + 10)
        elapsed = time.monotonic() - killed
        results = finish(*started, timeout_s=10)
        assert elapsed < PEER_TIMEOUT_S, (round_, victim, elapsed)
        for index, (code, output) in enumerate(results):
            if index == victim:
                continue
            assert code == 3, (round_, index, code, output[-3000:])
            errors = [line for line in output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and f"process {victim} of 3 was lost" in errors[0] and LOST_LINE in errors[0]
            # No fatal-error log, thread dump or traceback from the distributed runtime.
            assert "Traceback" not in output and "Fatal Python error" not in output, output[-3000:]
            assert not any(line[:1] in "EF" and line[1:5].isdigit() for line in output.splitlines()), output[-3000:]

    results = launch(workdir, 3, 1)
    for code, output in results:
        assert code == 0, output[-3000:]
    assert "resuming at step" in results[0][1]
    train_steps = [r["step"] for r in _records(workdir) if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == STEPS  # each step logged once
    # The same run as the uninterrupted one: final state and eval metrics, bit for bit.
    assert checksums(workdir, STEPS) == checksums(reference, STEPS)
    assert _final_eval(workdir) == _final_eval(reference)
