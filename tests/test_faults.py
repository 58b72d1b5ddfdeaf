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
def trained(tmp_path_factory):
    """A finished one-epoch run (22 steps) with checkpoints 15, 20 and 22."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train_and_evaluate(_config(), workdir)
    return workdir


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
    """A flip inside the data-iterator state leaves valid JSON: only the checksum can tell."""
    path = os.path.join(run, "checkpoints", "22", "data", "process_0-of-1.json")
    state = json.load(open(path))
    (index,) = state["last_seen_indices"]
    state["last_seen_indices"][index] -= 64  # a batch earlier: valid, and wrong
    with open(path, "w") as f:
        json.dump(state, f)
    assert _restore(run)[0] == 20
    assert any("checksum mismatch" in r.getMessage() and "data_iterator" in r.getMessage() for r in caplog.records)


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


# Issue 29: config ranges, history never destroyed, failed starts, the end line.


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("label_smoothing", 1.5, r"\[0, 1\)"),
        ("learning_rate", float("nan"), r"\(0, inf\)"),
        ("learning_rate", float("inf"), r"\(0, inf\)"),
        ("weight_decay", -1.0, r"\[0, inf\)"),
        ("warmup_epochs", -1.0, r"\[0, inf\)"),
        ("mixup_alpha", -0.2, r"\[0, inf\)"),
        ("cutmix_alpha", float("nan"), r"\[0, inf\)"),
        ("seed", -1, r"\[0, 2147483647\]"),
        ("momentum", 1.0, r"\[0, 1\)"),
        ("ema_decay", float("nan"), r"\[0, 1\)"),
    ],
)
def test_every_out_of_range_config_field_is_one_line_before_config_json(tmp_path, field, value, allowed):
    with pytest.raises(ConfigError) as raised:
        train_and_evaluate(_config(**{field: value}), str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and f"config.{field}=" in message and f"--config.{field}" in message
    assert __import__("re").search(allowed, message), message
    assert not (tmp_path / "config.json").exists()


def test_an_image_size_that_cannot_fit_is_refused_with_the_estimate(tmp_path):
    """image_size=100000 was OOM-killed after config.json was written; now one line with the estimate, and the
    size it advises passes the same check."""
    import re

    from resnext_jax.training.loop import build_model
    from resnext_jax.training.preflight import activation_bytes_per_image, check_image_size_fits

    with pytest.raises(ConfigError, match=r"image_size=100000 needs about .* of activation memory") as raised:
        train_and_evaluate(_config(image_size=100000), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    model = build_model(_config(), 10)
    per_image_16 = activation_bytes_per_image(model, 16)
    assert activation_bytes_per_image(model, 32) == pytest.approx(4 * per_image_16, rel=0.05)  # grows with pixels
    available = int(per_image_16 * 64 * 2 * 6)  # room for 6x the pixels of 16x16 at batch 64
    with pytest.raises(ConfigError, match=r"use --config.image_size=(\d+)") as raised:
        check_image_size_fits(model, 64, 64, available=available)
    advised = int(re.search(r"image_size=(\d+) or less", str(raised.value)).group(1))
    assert 16 <= advised < 64
    check_image_size_fits(model, advised, 64, available=available)  # following the advice passes


def test_a_failed_start_leaves_no_directory_behind(tmp_path):
    workdir = tmp_path / "runs" / "typo"
    os.makedirs(workdir.parent)
    with pytest.raises(UserError):
        train_and_evaluate(_config(model="resnext51"), str(workdir))
    assert not workdir.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError):
        train_and_evaluate(_config(label_smoothing=2.0), str(existing))
    assert existing.exists() and os.listdir(existing) == []  # the user's own folder stays, without a LOCK


@pytest.mark.slow  # a training run; CI runs it
def test_following_the_no_checkpoint_advice_keeps_the_metrics_history(run):
    """The advice ("move checkpoints aside to train from scratch") used to truncate metrics.jsonl to nothing."""
    before = open(os.path.join(run, "metrics.jsonl")).read()
    for step in (15, 20, 22):
        for path in _data_files(run, step):
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 2))
    with pytest.raises(UserError, match=r"move (\S+) aside to train from scratch") as raised:
        train_and_evaluate(_config(), run)
    directory = __import__("re").search(r"move (\S+) aside", str(raised.value)).group(1)
    shutil.move(directory, directory + ".aside")
    train_and_evaluate(_config(num_epochs=0.5), run)
    backups = glob.glob(os.path.join(run, "metrics.jsonl.*"))
    assert len(backups) == 1 and open(backups[0]).read() == before  # every record, byte for byte
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [10, 11]


def test_the_end_line_names_the_checkpoint_which_best_loads(tmp_path):
    """A tie in eval top-1 between a dropped step (220) and a kept one (308): both name 308."""
    from resnext_jax.inference.from_run import _best_step
    from resnext_jax.training.workdir import best_kept

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, top1 in ((100, 0.5), (220, 0.9889), (308, 0.9889), (400, 0.97)):
            f.write(json.dumps({"step": step, "split": "eval", "top1": top1}) + "\n")
    assert best_kept(str(tmp_path), [308, 400]) == (0.9889, 308) and _best_step(str(tmp_path), [308, 400]) == 308
    assert best_kept(str(tmp_path), [100, 220, 308]) == (0.9889, 220)  # the earliest on a tie, as load_model


@pytest.mark.slow  # a (zero-step) training rerun; CI runs it
def test_an_empty_metrics_log_ends_without_a_made_up_best(run, capsys):
    open(os.path.join(run, "metrics.jsonl"), "w").close()
    train_and_evaluate(_config(), run)
    err = capsys.readouterr().err
    assert "done: step 22, no eval recorded" in err and "-100" not in err and "None" not in err


def test_top5_is_shown_only_with_more_than_5_classes(capsys):
    from resnext_jax.training.metrics_log import Progress

    evals = {"eval": {"loss": 0.5, "top1": 0.9, "top5": 1.0}}
    for show_top5 in (False, True):
        progress = Progress(10, 0, 8, primary=True, show_bar=False, show_top5=show_top5)
        progress.epoch_line(1, 1, {"loss": 0.4, "top1": 0.8}, 1.0, evals)
        assert ("top5 100.00%" in capsys.readouterr().err) == show_top5


def _folder(root, class_names, seed):
    """root/<class>/<i>.png: 8 noisy images per class, each class a different colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(class_names):
        os.makedirs(os.path.join(root, name))
        for index in range(8):
            pixels = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            pixels[..., label % 3] += 150
            Image.fromarray(pixels).save(os.path.join(root, name, f"{index}.png"))


@pytest.mark.slow  # two short training runs; CI runs it
def test_a_run_records_its_dataset_and_notices_when_it_changes(tmp_path, capsys, caplog):
    """`prepare folder OTHER --name same --overwrite` (other classes): predict printed the new class names for the
    old model, evaluate scored against the new labels, and a rerun resumed on them; all silently, exit 0."""
    from resnext_jax.data.prepare.folder import prepare_folder
    from resnext_jax.errors import run_cli
    from resnext_jax.inference import load_model
    from resnext_jax.inference.evaluation import evaluate_accuracy
    from resnext_jax.predict import main as predict_main

    data_dir, workdir = str(tmp_path / "data"), str(tmp_path / "run")
    _folder(str(tmp_path / "fruit"), ("apple", "banana", "cherry"), seed=0)
    _folder(str(tmp_path / "tools"), ("hammer", "saw", "wrench"), seed=1)
    prepare_folder(str(tmp_path / "fruit"), "same", data_dir=data_dir, val_fraction=0.25, quiet=True)
    config = _config(dataset="same", data_dir=data_dir, batch_size=6, eval_batch_size=6, checkpoint_every_steps=2)
    train_and_evaluate(config, workdir, stop_at_step=2)
    recorded = json.load(open(os.path.join(workdir, "dataset.json")))
    assert recorded["class_names"] == ["apple", "banana", "cherry"] and recorded["splits"] == {
        "train": 18,
        "validation": 6,
    }

    prepare_folder(str(tmp_path / "tools"), "same", data_dir=data_dir, val_fraction=0.25, overwrite=True, quiet=True)
    with pytest.raises(ConfigError, match=r"dataset 'same' changed since .*\(classes \['apple'.*\] -> \['hammer'"):
        train_and_evaluate(config, workdir)  # the rerun refuses to resume on other labels
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # and trained nothing

    loaded = load_model(workdir)
    assert loaded.preprocessing.class_names == ("apple", "banana", "cherry")  # the recorded names
    assert tuple(loaded.preprocessing.mean) == tuple(recorded["mean"])
    assert "changed since this run trained on it" in loaded.source["dataset_changed"]
    image = os.path.join(str(tmp_path / "tools"), "saw", "0.png")
    caplog.clear()
    assert run_cli(predict_main, [workdir, image, "--json", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert {entry["name"] for entry in json.loads(out)["top_k"]} == {"apple", "banana", "cherry"}
    assert [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]  # said in one line
    with pytest.raises(UserError, match="no longer match the model's classes"):
        evaluate_accuracy(loaded, "same", data_dir=data_dir, batch_size=6)

    summary = train_and_evaluate(config, workdir, allow_changes=True)  # continuing on the new data is recorded
    assert summary["step"] == 3  # one epoch of 18 images at batch 6
    changes = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
    assert changes[-1]["changes"]["dataset"]["to"]["class_names"] == ["hammer", "saw", "wrench"]
    assert json.load(open(os.path.join(workdir, "dataset.json")))["class_names"] == ["hammer", "saw", "wrench"]
    assert glob.glob(os.path.join(workdir, "dataset.json.*"))  # the old record is kept beside it


def test_a_missing_checksums_item_is_damage_not_an_old_checkpoint(run, caplog):
    """It was called "predates checksums" and loaded unverified; the step's own metadata says it had them."""
    from resnext_jax.inference import load_model

    shutil.rmtree(os.path.join(run, "checkpoints", "22", "checksums"))
    with pytest.raises(UserError, match=r"step 22 .* is damaged: its checksums item is missing; pick another step"):
        load_model(run, which=22)
    step, _ = _restore(run)
    assert step == 20
    assert any("checksums item is missing" in r.getMessage() for r in caplog.records)
    assert not any("predates checksums" in r.getMessage() for r in caplog.records)


def test_checkpoints_damaged_existing_as_a_file_is_one_line_whose_advice_works(run):
    for path in _data_files(run, 22):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with open(os.path.join(run, DAMAGED_DIR), "w") as f:
        f.write("a note the user kept here")
    with pytest.raises(UserError, match=r"checkpoints_damaged is a file.* rename or move that file, then rerun"):
        _restore(run)
    os.rename(os.path.join(run, DAMAGED_DIR), os.path.join(run, "notes.txt"))  # following the advice
    step, _ = _restore(run)
    assert step == 20 and os.path.isdir(os.path.join(run, DAMAGED_DIR))


@pytest.mark.slow  # a subprocess that imports JAX and restores; CI runs it
def test_a_deleted_manifest_falls_back_without_orbax_event_loop_noise(run):
    os.remove(os.path.join(run, "checkpoints", "22", "state", "manifest.ocdbt"))
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests'];"
        "from test_faults import _restore; print('restored', _restore(sys.argv[2])[0])"
    )
    env = dict(os.environ, RESNEXT_JAX_HUGEPAGES="0")
    done = subprocess.run(
        [sys.executable, "-c", script, ROOT, run], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0 and "restored 20" in done.stdout, done.stderr[-2000:]
    assert "Event loop is closed" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "checkpoint step 22" in done.stderr  # the one warning that names the problem stays


def test_removing_lock_under_a_live_run_does_not_let_a_second_run_in(tmp_path):
    """After `rm LOCK` mid-run, a second run started beside the live one and called its checkpoints incomplete."""
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
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.remove(tmp_path / "LOCK")
        with pytest.raises(ConfigError, match=r"in use by another run \(another process; its LOCK file was removed\)"):
            train_and_evaluate(_config(), str(tmp_path))
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = WorkdirLock(str(tmp_path))  # the dead holder's locks are dropped by the kernel
    lock.acquire()
    lock.release()
