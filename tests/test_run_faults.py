"""Faults around a run's records (issue 29): config ranges checked before config.json, the dataset a run trained
on, metrics history never deleted, the end line, checkpoint errors (a missing checksums item, checkpoints_damaged as a
file, Orbax's event-loop noise) and a removed LOCK. Each case ends in one clear line or in nothing lost.

docs/reliability.md lists every case with its test. The rest of the training faults are in test_faults.py.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_faults import ROOT, _config, _data_files, _restore

from resnext_jax.errors import UserError
from resnext_jax.training import ConfigError, read_metrics, train_and_evaluate
from resnext_jax.training.checkpoint import DAMAGED_DIR
from resnext_jax.training.workdir import WorkdirLock


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
    assert re.search(allowed, message), message
    assert not (tmp_path / "config.json").exists()


def test_an_image_size_that_cannot_fit_is_refused_with_the_estimate(tmp_path):
    """image_size=100000 was OOM-killed after config.json was written; now one line with the estimate, and the
    size it advises passes the same check."""
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
    directory = re.search(r"move (\S+) aside", str(raised.value)).group(1)
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


def _delete_manifest(state: str) -> str:
    os.remove(os.path.join(state, "manifest.ocdbt"))
    return "state manifest"


def _delete_data_files(state: str) -> str:
    data = os.path.join(state, "ocdbt.process_0", "d")
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    return "cannot be read"  # this one reaches Orbax's read, whose leftovers report themselves late


@pytest.mark.slow  # a subprocess that imports JAX and restores; CI runs it
@pytest.mark.parametrize("damage", [_delete_manifest, _delete_data_files])
def test_a_damaged_state_item_falls_back_without_orbax_asyncio_noise(run, damage):
    problem = damage(os.path.join(run, "checkpoints", "22", "state"))
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests'];"
        "from test_faults import _restore; print('restored', _restore(sys.argv[2])[0])"
    )
    env = dict(os.environ, RESNEXT_JAX_HUGEPAGES="0")
    done = subprocess.run(
        [sys.executable, "-c", script, ROOT, run], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0 and "restored 20" in done.stdout, done.stderr[-2000:]
    for noise in ("Event loop is closed", "Traceback", "never retrieved", "never awaited"):
        assert noise not in done.stderr, done.stderr[-2000:]
    assert "checkpoint step 22" in done.stderr and problem in done.stderr  # the one warning naming the problem


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


@pytest.mark.parametrize("num_classes", [3, 10])
def test_evaluate_prints_top5_only_with_more_than_5_classes(num_classes):
    from resnext_jax.evaluate import accuracy_line

    report = {
        "model": {"name": "resnet18"},
        "dataset": {"name": "shapes", "split": "validation", "num_classes": num_classes},
        "accuracy": {"top1": 0.9, "top5": 1.0, "loss": 0.3, "count": 30},
    }
    line = accuracy_line(report)
    assert line.startswith("resnet18 on shapes:validation: top-1 90.00%, ")
    assert ("top-5 100.00%" in line) == (num_classes > 5)


def test_a_changed_class_count_is_refused_even_with_allow_changes(tmp_path):
    """--allow_changes cannot continue a 4-class model on 10 classes: restoring would fail on the head's shape and
    call every checkpoint damaged. The message says so and names the way that works (a new workdir, init_from)."""
    from resnext_jax.data.identity import dataset_identity
    from resnext_jax.training.workdir import check_dataset, record_dataset

    digits = dataset_identity("digits")
    record_dataset(str(tmp_path), {**digits, "num_classes": 4, "class_names": ["a", "b", "c", "d"]})
    with pytest.raises(ConfigError, match=r"its model has 4 outputs, so no run can continue .*init_from="):
        check_dataset(str(tmp_path), "digits", None, allow_changes=True)
    record_dataset(str(tmp_path), {**digits, "fingerprint": "00000000"})  # same classes, rewritten files
    assert glob.glob(str(tmp_path / "dataset.json.*"))  # the earlier record is kept
    with pytest.raises(ConfigError, match=r"files rewritten .*--allow_changes"):
        check_dataset(str(tmp_path), "digits", None, allow_changes=False)
    identity, change = check_dataset(str(tmp_path), "digits", None, allow_changes=True)
    assert identity == digits and change["dataset"][1]["fingerprint"] == digits["fingerprint"]
