"""The `python -m train` entry point: flag overrides, SIGTERM (finish the step, save, exit 0) and resuming."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _train(*args):
    return [sys.executable, "-m", "train", "--config", "configs/quickstart.py", *args]


def test_misspelled_override_names_the_closest_key(tmp_path):
    result = subprocess.run(
        _train("--workdir", str(tmp_path), "--config.learnin_rate=0.1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert 'Did you mean "learning_rate"' in result.stderr


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_the_rerun_resumes(tmp_path):
    args = _train("--workdir", str(tmp_path), "--config.num_epochs=2", "--config.progress_bar=False")
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopping at step" in stderr
    stopped_at = int(stderr.split("stopping at step ")[1].split(":")[0])
    assert 10 <= stopped_at < 88
    assert os.path.isdir(tmp_path / "checkpoints" / str(stopped_at))

    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in rerun.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert evals[-1]["step"] == 88 and evals[-1]["top1"] > 0.8
