"""Multi-host path on one machine: 2 CPU processes x 2 devices talking through gloo, launched with the explicit
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, as a cluster launcher would."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    port = _free_port()
    processes = []
    for index in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(index),
        )
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "train",
                    "--config",
                    "configs/quickstart.py",
                    "--workdir",
                    str(tmp_path),
                    "--config.num_epochs=1",
                    "--config.progress_bar=False",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[1] for p in processes]
    for process, stderr in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "4 device(s), 2 process(es)" in outputs[0]
    assert "epoch 1/1" in outputs[0] and "epoch 1/1" not in outputs[1]  # only process 0 reports
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["count"] == 360  # each eval example counted once across processes
    assert evals[0]["top1"] > 0.5
    data_state = os.listdir(tmp_path / "checkpoints" / str(evals[0]["step"]) / "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_state)  # each process's data position
