"""Faults and bad input in the training system: damaged checkpoints, two writers, failed starts, torn logs,
divergence, full and read-only disks. Each case ends in a fallback that loses nothing or in one clear error.

docs/reliability.md lists every case with the test that proves it. NaN propagation is in test_nonfinite.py,
the model and converter cases in test_bad_input.py / test_convert.py, kill -9 and SIGTERM in test_train_cli.py.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_training import tiny_config

from resnext_jax.errors import UserError
from resnext_jax.training import ConfigError, read_metrics, train_and_evaluate
from resnext_jax.training.checkpoint import DAMAGED_DIR, Checkpointer
from resnext_jax.training.guards import TrainingDiverged
from resnext_jax.training.step import create_train_state, init_variables
from resnext_jax.training.workdir import WorkdirLock

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _config(**changes):
    return tiny_config(**{"num_epochs": 1, "checkpoint_every_steps": 5, **changes})


@pytest.fixture(scope="module")
def trained(tiny_checkpointed_run):
    """A finished one-epoch run (22 steps) with checkpoints 15, 20 and 22 (conftest's, shared; copied by `run`)."""
    return tiny_checkpointed_run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the finished run."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


def _data_files(workdir, step):
    """The array-data files of checkpoint `step` (Orbax's OCDBT spreads the arrays over several)."""
    return glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)


def _restore(workdir):
    """Restores `workdir`'s newest verified checkpoint the way the loop does: (step, state)."""
    from resnext_jax.data import create_train_loader
    from resnext_jax.training.loop import build_model
    from resnext_jax.training.optim import create_learning_rate_schedule, create_optimizer

    config = _config()
    model = build_model(config, 10)
    variables = init_variables(model, jax.random.PRNGKey(0), config.image_size)
    tx = create_optimizer(config, create_learning_rate_schedule(config, 22), variables["params"])
    state = create_train_state(tx, variables, jax.random.PRNGKey(1), False)
    loader = create_train_loader("digits", batch_size=config.batch_size, image_size=16, transform="none")
    checkpointer = Checkpointer(workdir, 3)
    try:
        return checkpointer.restore(state, iter(loader))
    finally:
        checkpointer.close()


def _checksums(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata")) as f:
        return json.load(f)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no-metadata", "no-manifest", "no-commit-marker"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_that_verifies(run, damage, caplog):
    step_dir = os.path.join(run, "checkpoints", "22")
    if damage == "truncated":
        for path in _data_files(run, 22):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif damage == "flipped":
        for path in _data_files(run, 22):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "no-metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif damage == "no-manifest":
        os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
    else:
        os.remove(os.path.join(step_dir, "commit_success.txt"))
    step, state = _restore(run)
    assert step == 20 and int(state.step) == 20
    warnings = [r.getMessage() for r in caplog.records if "checkpoint step 22 in" in r.getMessage()]
    assert len(warnings) == 1 and "damaged" in warnings[0], warnings
    # Never deleted: set aside with a note of what was wrong, out of Orbax's retention.
    (kept,) = glob.glob(os.path.join(run, DAMAGED_DIR, "22-*"))
    assert "failed verification" in open(os.path.join(kept, "DAMAGED.txt")).read()
    assert not os.path.exists(step_dir)


def test_flipped_bytes_are_caught_by_the_checksums_when_the_file_still_parses(run, caplog):
    """A flip inside the data-position record leaves valid JSON: only the checksum can tell."""
    path = os.path.join(run, "checkpoints", "22", "data", "process_0-of-1.json")
    state = json.load(open(path))
    state["step"] -= 1  # a batch earlier: valid, and wrong
    with open(path, "w") as f:
        json.dump(state, f, sort_keys=True)
    assert _restore(run)[0] == 20
    assert any("checksum mismatch" in r.getMessage() and "data_iterator" in r.getMessage() for r in caplog.records)


def test_an_array_whose_checksum_differs_is_caught_when_every_file_still_parses(run, caplog):
    """Arrays that read back fine but are not what was saved (here: the saved CRC of one kernel moved by one bit,
    the same as its data moving after the save): only the array checksums can tell."""
    path = os.path.join(run, "checkpoints", "22", "checksums", "metadata")
    sums = _checksums(run, 22)
    key = next(k for k in sorted(sums) if k.endswith("['kernel']") and "params" in k)
    crc, rest = sums[key].split(" ", 1)
    sums[key] = f"{int(crc, 16) ^ 1:08x} {rest}"
    with open(path, "w") as f:
        json.dump(sums, f)
    assert _restore(run)[0] == 20
    assert any("checksum mismatch" in r.getMessage() and "kernel" in r.getMessage() for r in caplog.records)


def test_no_checkpoint_that_verifies_is_one_error_that_deletes_nothing(run):
    for step in (15, 20, 22):
        os.remove(os.path.join(run, "checkpoints", str(step), "state", "_METADATA"))
    with pytest.raises(
        UserError,
        match=r"no checkpoint in .* verifies \(step 22: .*step 20: .*step 15: .*\)\. "
        r"Nothing was deleted",
    ):
        _restore(run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["15", "20", "22"]


@pytest.mark.slow
def test_a_finished_run_with_a_damaged_final_step_saves_it_again_bit_identical(run):
    original = _checksums(run, 22)
    os.remove(os.path.join(run, "checkpoints", "22", "commit_success.txt"))
    summary = train_and_evaluate(_config(), run)
    assert summary["step"] == 22
    assert _checksums(run, 22) == original  # retrained from step 20 to exactly the same state
    assert _restore(run)[0] == 22
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == sorted(set(steps))  # each step logged once


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on .*Ctrl-C"):
            train_and_evaluate(_config(), str(tmp_path))
    assert not (tmp_path / "config.json").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from resnext_jax.training.workdir import WorkdirLock;"
            "lock = WorkdirLock(sys.argv[2]); lock.acquire(); print('locked', flush=True); time.sleep(60)",
            ROOT,
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()  # kill -9: the kernel drops its flock
    holder.wait()
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    assert json.load(open(tmp_path / "LOCK"))["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("typo", [dict(model="resnext51"), dict(dataset="digitz"), dict(batch_size=0)])
def test_a_failed_start_leaves_the_workdir_free_for_the_fixed_config(tmp_path, typo):
    with pytest.raises(UserError):
        train_and_evaluate(_config(**typo), str(tmp_path))
    assert not (tmp_path / "config.json").exists()


@pytest.mark.slow  # a training run or a subprocess; CI runs it
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run, caplog):
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 23, "split": "tra')
    records = read_metrics(run)
    assert records[-1]["step"] == 22 and any("not a whole record" in r.getMessage() for r in caplog.records)
    train_and_evaluate(_config(), run)  # the finished run reruns; the torn line is gone
    assert all(line.endswith("}") for line in open(os.path.join(run, "metrics.jsonl")).read().splitlines())


@pytest.mark.slow  # a training run or a subprocess; CI runs it
def test_a_restart_from_step_0_drops_the_records_of_the_killed_attempt(tmp_path):
    """A run killed before its first checkpoint left records; the restart logs each step once."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "split": "train", "loss": 9.0}) + "\n")
    train_and_evaluate(_config(num_epochs=0.5), str(tmp_path))
    steps = [r["step"] for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert steps == sorted(set(steps)) and 9.0 not in [r["loss"] for r in read_metrics(str(tmp_path))]


@pytest.mark.slow  # a training run or a subprocess; CI runs it
def test_the_divergence_message_gives_a_command_the_guard_accepts(tmp_path):
    sane = _config(optimizer="sgd", learning_rate=1e-3, grad_clip_norm=0.0, warmup_epochs=0, log_every_steps=1)
    train_and_evaluate(sane, str(tmp_path), stop_at_step=10)
    wild = _config(optimizer="sgd", learning_rate=1e12, grad_clip_norm=0.0, warmup_epochs=0, log_every_steps=1)
    with pytest.raises(TrainingDiverged, match=r"step 10\) .* is intact.*--config.learning_rate=\S+ --allow_changes"):
        train_and_evaluate(wild, str(tmp_path), allow_changes=True)
    with pytest.raises(ConfigError, match=r"(?s)learning_rate: 1000000000000.0 -> 0.001.*--allow_changes"):
        train_and_evaluate(sane, str(tmp_path))
    summary = train_and_evaluate(sane, str(tmp_path), allow_changes=True)
    assert summary["step"] == 22 and np.isfinite(summary["train"]["loss"])
    records = [json.loads(line) for line in open(tmp_path / "config_changes.jsonl")]
    assert [r["changes"] for r in records] == [
        {"learning_rate": {"from": 1e-3, "to": 1e12}},
        {"learning_rate": {"from": 1e12, "to": 1e-3}},
    ]
    assert [r["step"] for r in records] == [10, 10]
    assert json.load(open(tmp_path / "config.json"))["learning_rate"] == 1e-3
    steps = [r["step"] for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert steps == list(range(1, 23))  # the diverged attempt's records are gone


def test_structural_changes_are_refused_even_with_allow_changes(run):
    with pytest.raises(ConfigError, match="image_size"):
        train_and_evaluate(_config(image_size=24), run, allow_changes=True)
    with pytest.raises(ConfigError, match="grad_clip_norm cannot switch"):
        train_and_evaluate(_config(grad_clip_norm=0.0), run, allow_changes=True)


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); the case needs one")


@pytest.mark.slow  # a training run or a subprocess; CI runs it
def test_a_full_disk_is_one_line_with_the_free_space(tmp_path):
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=2m")
    try:
        # Leave about 150 KiB: room for the records, not for a checkpoint.
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (2 * 2**20 - 150 * 2**10))
        with pytest.raises(UserError, match=r"the disk holding .* is full \(0\.\d MiB free\)"):
            train_and_evaluate(_config(num_epochs=0.5), str(mount / "run"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_workdir_is_one_line(tmp_path):
    mount = tmp_path / "ro"
    _mount_tmpfs(mount, "ro,size=1m")
    try:
        with pytest.raises(UserError, match=r"is not writable \(Read-only file system\).*use a writable directory"):
            train_and_evaluate(_config(), str(mount / "run"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow  # a training run or a subprocess; CI runs it
def test_cli_prints_known_errors_as_one_line_and_takes_model_kwargs_overrides(tmp_path):
    """A typo'd model is one line (traceback behind --verbose); a documented model_kwargs field overrides."""

    def train(*args):
        return subprocess.run(
            [sys.executable, "-m", "train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    result = train("--config.model=resnext51")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "resnext51" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "Traceback" in train("--config.model=resnext51", "--verbose").stderr

    unknown = train("--config.model_kwargs.drop_path_rat=0.1")
    assert unknown.returncode != 0 and 'Did you mean "drop_path_rate"' in unknown.stderr
    ok = train("--config.model_kwargs.drop_path_rate=0.1", "--config.num_epochs=0.05", "--config.progress_bar=False")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.load(open(tmp_path / "config.json"))["model_kwargs"]["drop_path_rate"] == 0.1


@pytest.mark.slow
@pytest.mark.alone  # its kills land at moments timed against a run that expects the CPUs to itself
def test_kill_9_at_random_moments_resumes_bit_identical(tmp_path):
    """Three kill -9s at random moments (saves every 5 steps, so some land inside one), then a rerun to the end:
    the final checkpoint is bit-identical to an uninterrupted run's (their checksums are equal)."""
    import random
    import time

    def command(workdir):
        return [
            sys.executable,
            "-m",
            "train",
            "--config",
            "configs/quickstart.py",
            "--workdir",
            str(workdir),
            "--config.num_epochs=1",
            "--config.checkpoint_every_steps=5",
            "--config.progress_bar=False",
            "--config.write_report=False",
        ]

    env = dict(os.environ, RESNEXT_JAX_HUGEPAGES="0")
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = []
    for _attempt in range(3):
        process = subprocess.Popen(
            command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Start-up takes seconds; kill somewhere between the first steps and the end of the epoch.
        records = len(open(killed / "metrics.jsonl").readlines()) if (killed / "metrics.jsonl").exists() else 0
        deadline = time.time() + 300
        while (
            time.time() < deadline
            and process.poll() is None
            and not ((killed / "metrics.jsonl").exists() and len(open(killed / "metrics.jsonl").readlines()) > records)
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.0))
        process.kill()
        process.wait()
        kills.append(sorted(os.listdir(killed / "checkpoints")) if (killed / "checkpoints").exists() else [])
    rerun = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (kills, rerun.stderr[-3000:])
    assert _checksums(killed, 44) == _checksums(reference, 44), kills
    steps = [r["step"] for r in read_metrics(str(killed)) if r["split"] == "train"]
    assert steps == [r["step"] for r in read_metrics(str(reference)) if r["split"] == "train"]
