"""`python -m resnext_jax.plot`: training curves from metrics.jsonl, for one run or several on one figure."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from resnext_jax.errors import run_cli
from resnext_jax.plot import main as plot_main
from resnext_jax.plot import plot_curves, read_run, series


def fake_run(path, steps=60, seed=0, torn=False):
    """A workdir whose metrics.jsonl holds a decaying train loss, a cosine learning rate and eval every 20 steps."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(5, steps + 1, 5):
            lr = 0.5 * 1e-2 * (1 + math.cos(math.pi * step / steps))
            loss = 2.3 * math.exp(-step / 25) + 0.05 * rng.random()
            f.write(json.dumps({"step": step, "split": "train", "loss": loss, "top1": 0.5, "learning_rate": lr}) + "\n")
            if step % 20 == 0:
                f.write(json.dumps({"step": step, "split": "eval", "loss": loss * 1.1, "top1": 1 - loss / 2.5}) + "\n")
        if torn:
            f.write('{"step": 65, "split": "tra')
    return str(path)


def pixels(path):
    return np.asarray(Image.open(path).convert("L"), np.float32)


def coloured(path):
    """Pixels of the plotted lines: axes, ticks and text are gray or black, matplotlib's line colours are not."""
    rgb = np.asarray(Image.open(path).convert("RGB"), np.int16)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


def test_series_reads_the_logged_values_in_step_order(tmp_path):
    run = fake_run(tmp_path / "a", torn=True)  # a torn last line (a crash mid-write) is skipped
    records = read_run(run)
    steps, lr = series(records, "train", "learning_rate")
    assert steps == list(range(5, 61, 5))
    assert lr[-1] == pytest.approx(0.0, abs=1e-12) and lr[0] > lr[5] > lr[-1]
    assert series(records, "eval", "top1")[0] == [20, 40, 60]


def test_curves_png_is_drawn_for_one_and_for_several_runs(tmp_path, capsys, monkeypatch):
    run_a, run_b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", seed=1)
    assert run_cli(plot_main, [run_a]) == 0
    one = os.path.join(run_a, "training_curves.png")
    assert capsys.readouterr().out.strip() == one
    # A figure of four drawn panels, not a blank canvas: white with a few lines has a small variance.
    assert pixels(one).shape == (700, 1100) and pixels(one).var() > 300

    monkeypatch.chdir(tmp_path)  # several runs: ./training_curves.png unless --out
    assert run_cli(plot_main, [run_a, run_b]) == 0
    both = str(tmp_path / "training_curves.png")
    assert capsys.readouterr().out.strip() == "training_curves.png"
    assert coloured(one) > 1000  # four panels of curves
    assert coloured(both) > coloured(one) * 1.5  # two runs draw two lines per panel

    empty = str(tmp_path / "empty.png")
    plot_curves({"nothing": []}, empty)  # every panel says "not logged"
    assert coloured(empty) == 0 and pixels(empty).var() < pixels(one).var()


def test_plot_errors_are_one_line(tmp_path, capsys):
    run = fake_run(tmp_path / "a")
    assert run_cli(plot_main, [run, "--out", str(tmp_path / "missing" / "x.png")]) == 2
    assert "pass another --out" in capsys.readouterr().err
    assert run_cli(plot_main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no metrics.jsonl" in err and err.count("\n") == 1
