"""Logs that fit where they go: periodic lines instead of a progress bar without a terminal, and labelled means."""

import os
import re

import pytest
from test_training import tiny_config

from resnext_jax.training import read_metrics, train_and_evaluate
from resnext_jax.training.metrics_log import Progress

LINE = re.compile(
    r"^step (\d+)/30 \((\d+)%\) \| train loss (\d\.\d{4}) \(mean of the last (\d+) steps\) \| \d+ img/s \| "
    r"ETA \d+:\d\d$"
)


def test_without_a_terminal_the_bar_becomes_periodic_lines(capsys):
    progress = Progress(30, 0, 8, primary=True, show_bar=True, line_every_s=0.0)  # capsys: stderr is no terminal
    assert progress.periodic
    for step in range(1, 31):
        progress.update(step, {"loss": step / 100} if step % 10 == 0 else None)
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [LINE.match(line).groups() for line in lines] == [
        ("10", "33", "0.1000", "10"),
        ("20", "67", "0.2000", "10"),
        ("30", "100", "0.3000", "10"),
    ]


def test_periodic_lines_are_spaced_in_time_and_the_last_step_always_shows(capsys):
    progress = Progress(30, 0, 8, primary=True, show_bar=True, periodic=True, line_every_s=3600.0)
    for step in range(1, 31):
        progress.update(step, {"loss": 0.5} if step % 5 == 0 else None)
    assert [LINE.match(line).group(1) for line in capsys.readouterr().err.splitlines()] == ["30"]


def test_a_terminal_keeps_the_bar_and_other_processes_print_nothing(capsys):
    bar = Progress(30, 0, 8, primary=True, show_bar=True, periodic=False)
    bar.update(10, {"loss": 0.5})
    bar.close()
    assert "\r" in capsys.readouterr().err  # tqdm's frames
    quiet = Progress(30, 0, 8, primary=False, show_bar=True, line_every_s=0.0)
    quiet.update(10, {"loss": 0.5})
    assert capsys.readouterr().err == ""


def test_the_epoch_line_says_it_is_the_epoch_mean(capsys):
    Progress(30, 0, 8, primary=True, show_bar=False).epoch_line(1, 3, {"loss": 0.4, "top1": 0.8}, 1.0, {})
    assert "epoch 1/3 | train (epoch mean) loss 0.4000 top1 80.00% |" in capsys.readouterr().err


@pytest.mark.slow  # a short training run
def test_the_summary_names_the_steps_its_train_metrics_average(tmp_path, capsys):
    """11 steps logged every 4: the summary's train metrics are the logged mean of steps 9..11, and the run's log,
    piped (no terminal), holds plain lines, no carriage returns."""
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(tiny_config(num_epochs=0.5, log_every_steps=4, progress_bar=True), workdir)
    assert summary["train_steps"] == [9, 11]
    [last] = [r for r in read_metrics(workdir) if r["split"] == "train" and r["step"] == 11]
    assert summary["train"]["loss"] == pytest.approx(last["loss"], abs=1e-6)
    err = capsys.readouterr().err
    assert "\r" not in err and "train (epoch mean) loss" in err
    # The workdir keeps the same lines, time-stamped, in train.log.
    logged = [line.split(" ", 2)[2] for line in open(os.path.join(workdir, "train.log")).read().splitlines()]
    assert logged == [line for line in err.splitlines() if line in logged] and len(logged) >= 4
    assert logged[0].startswith("resnext50_32x4d (") and logged[-1].startswith("done: step 11")
    assert re.search(r"^step 11/11 \(100%\) \| train loss \d\.\d{4} \(mean of the last 3 steps\)", err, re.M)
