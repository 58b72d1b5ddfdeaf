"""Local multi-host launcher: N training processes of D CPU devices each on this machine, talking through gloo,
with the variables a cluster launcher would set (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

    python launch/local.py --processes 2 --devices 2 -- --config configs/quickstart.py --workdir /tmp/mh

Everything after `--` goes to `python -m train` on every process. Process 0 prints the run's progress; the
others' output goes to `<workdir>/launch/process_<i>.log` (with `--workdir`, else the console too). The launcher
exits with the first non-zero exit code, after all processes have ended. Relaunching the same command resumes the
run, on the same or another number of processes. The tests use `start` and `stop` from here.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port that is free on this machine now (for the coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(index: int, processes: int, devices: int, port: int, base: dict | None = None) -> dict:
    """The environment of process `index`: CPU platform, `devices` host devices, gloo collectives, coordinator."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(index),
    )
    return env


def start(
    train_args: list[str],
    processes: int,
    devices: int,
    *,
    port: int | None = None,
    env: dict | None = None,
    stdout=None,
    stderr=None,
) -> list[subprocess.Popen]:
    """Starts `processes` copies of `python -m train *train_args` (process 0 first); returns their Popen objects.

    `stdout`/`stderr`: None inherits the console; a callable `f(index) -> file or subprocess constant` chooses per
    process (e.g. a log file, or subprocess.PIPE).
    """
    port = free_port() if port is None else port
    started = []
    try:
        for index in range(processes):
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "train", *train_args],
                    cwd=ROOT,
                    env=process_env(index, processes, devices, port, env),
                    stdout=stdout(index) if callable(stdout) else stdout,
                    stderr=stderr(index) if callable(stderr) else stderr,
                    text=True,
                )
            )
    except BaseException:
        stop(started)
        raise
    return started


def stop(started: list[subprocess.Popen], sig: int = signal.SIGKILL, timeout_s: float = 30) -> None:
    """Sends `sig` to each process of `started` that still runs (by its pid), then waits for it."""
    for process in started:
        if process.poll() is None:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
    for process in started:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _workdir(train_args: list[str]) -> str | None:
    for i, arg in enumerate(train_args):
        if arg == "--workdir" and i + 1 < len(train_args):
            return train_args[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="training processes (hosts) to start")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of python -m train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    workdir = _workdir(train_args)
    logs = []
    if workdir:
        os.makedirs(os.path.join(workdir, "launch"), exist_ok=True)

    def output(index):
        if index == 0 or not workdir:
            return None
        logs.append(open(os.path.join(workdir, "launch", f"process_{index}.log"), "w"))
        return logs[-1]

    started = start(train_args, args.processes, args.devices, stdout=output, stderr=subprocess.STDOUT)

    def forward(signum, frame):  # a scheduler's SIGTERM to the launcher reaches every process: all save and exit 0
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        codes = [process.wait() for process in started]
    except KeyboardInterrupt:  # Ctrl-C reached every process of the group: they save and exit
        codes = [process.wait() for process in started]
    finally:
        for f in logs:
            f.close()
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
