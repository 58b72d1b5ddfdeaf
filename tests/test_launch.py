"""launch/: the cluster recipes parse and agree with what the training system reads; the local launcher runs a
multi-host job (tests/test_train_multihost.py and tests/test_multihost_*.py start their processes through it)."""

import os
import re
import subprocess

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LAUNCH = os.path.join(ROOT, "launch")


def _read(name):
    with open(os.path.join(LAUNCH, name)) as f:
        return f.read()


def test_the_shell_recipes_parse_and_run_the_training_command():
    for name in ("slurm.sbatch", "tpu_vm_pod.sh"):
        done = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "python -m train --config" in _read(name)


def test_slurm_requeues_on_preemption_with_one_task_per_node():
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", _read("slurm.sbatch"), re.MULTILINE))
    assert directives["ntasks-per-node"] == "1"
    assert directives["signal"] == "TERM@120" and "requeue" in directives
    assert "exec srun" in _read("slurm.sbatch")  # SIGTERM reaches the training processes, not a shell


def test_the_jobset_points_every_pod_at_process_0_through_its_service():
    manifest = yaml.safe_load(_read("jobset.yaml"))
    assert manifest["kind"] == "JobSet" and manifest["apiVersion"].startswith("jobset.x-k8s.io/")
    name, subdomain = manifest["metadata"]["name"], manifest["spec"]["network"]["subdomain"]
    (job,) = manifest["spec"]["replicatedJobs"]
    spec = job["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    # <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>: the pod of completion index 0.
    host, port = env["JAX_COORDINATOR_ADDRESS"]["value"].rsplit(":", 1)
    assert host == f"{name}-{job['name']}-0-0.{subdomain}"
    assert int(port) in [p["containerPort"] for p in container["ports"]]
    assert int(env["JAX_NUM_PROCESSES"]["value"]) == spec["parallelism"] * job["replicas"]
    assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["command"] == ["python", "-m", "train"]
    # Long enough for the SIGTERM save.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


def test_the_local_launcher_sets_each_process_variables():
    import sys

    sys.path.insert(0, ROOT)
    from launch import local

    env = local.process_env(2, 3, 4, 12345, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --other"})
    assert env["JAX_PROCESS_ID"] == "2" and env["JAX_NUM_PROCESSES"] == "3"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12345" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert env["XLA_FLAGS"].split() == ["--other", "--xla_force_host_platform_device_count=4"]
