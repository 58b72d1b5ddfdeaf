"""`python -m resnext_jax.evaluate` and the report on a short digits run: its numbers equal the training log's for
the same checkpoint, every example counts once, the report holds (and docs/inference.md explains) every field,
and predict's preprocessing of image files equals the eval loader's.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import resnext_jax
from resnext_jax import data
from resnext_jax.errors import UserError, run_cli
from resnext_jax.evaluate import main as evaluate_main
from resnext_jax.inference import predict_files
from resnext_jax.inference.evaluation import evaluate_accuracy
from resnext_jax.training import read_metrics

pytestmark = pytest.mark.slow  # one 2-epoch training run (about 40 s on 2 cores) shared by the module
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "inference.md")


@pytest.fixture(scope="module")
def workdir(tiny_run):
    return tiny_run  # conftest's shared run: tiny_config, 2 epochs, EMA 0.9


def logged(workdir, split, step):
    [record] = [r for r in read_metrics(workdir) if r["split"] == split and r["step"] == step]
    return record


@pytest.mark.parametrize("which, split, step", [("latest", "eval", 44), (22, "eval", 22), ("ema", "eval_ema", 44)])
def test_accuracy_equals_the_logged_eval_of_the_same_checkpoint(workdir, which, split, step):
    loaded = resnext_jax.load_model(workdir, which=which)
    assert loaded.source["step"] == step
    result = evaluate_accuracy(loaded, "digits")
    record = logged(workdir, split, step)
    num_eval = data.dataset_info("digits").num_eval
    assert result["count"] == record["count"] == num_eval == 360
    # The log rounds to 6 digits; the correct counts behind both must be the same integers.
    assert result["correct"] == round(record["top1"] * num_eval)
    assert result["correct_top5"] == round(record["top5"] * num_eval)
    assert abs(result["top1"] - record["top1"]) < 5e-7
    assert abs(result["loss"] - record["loss"]) < 1e-5
    confusion = result["confusion"]
    assert confusion.sum() == num_eval and np.trace(confusion) == result["correct"]


def test_best_is_the_checkpoint_with_the_highest_logged_top1(workdir):
    evals = [r for r in read_metrics(workdir) if r["split"] == "eval"]
    best = max(evals, key=lambda r: r["top1"])["step"]
    assert resnext_jax.load_model(workdir).source["step"] == best


def test_another_split_counts_each_of_its_examples_once(workdir):
    result = evaluate_accuracy(resnext_jax.load_model(workdir), "digits", split="train", batch_size=256)
    assert result["count"] == data.dataset_info("digits").num_train == 1437


def test_predict_on_image_files_equals_the_eval_loader(workdir, tmp_path):
    """The same eval records as files: predict's probabilities equal the model on the eval loader's batch."""
    from resnext_jax.data.datasets import open_source

    loaded = resnext_jax.load_model(workdir)
    pre = loaded.preprocessing
    source = open_source("digits", "test")
    paths = []
    for index in range(8):
        path = tmp_path / f"{index}.png"
        path.write_bytes(source[index]["image"])
        paths.append(str(path))
    loader = data.create_eval_loader(
        "digits", batch_size=8, image_size=pre.crop_size, resize_size=pre.resize_size, mean=pre.mean, std=pre.std
    )
    batch = next(iter(loader))
    logits = loaded.module.apply(loaded.variables, batch["image"], train=False)
    expected = np.asarray(jax.nn.softmax(logits, -1))
    results = list(predict_files(loaded, paths, top_k=10))
    for row, result in enumerate(results):
        got = np.zeros(10)
        for label, name, probability in result.top_k:
            assert name == str(label)
            got[label] = probability
        np.testing.assert_allclose(got, expected[row], atol=1e-6)


REPORT_FIELDS = {
    "schema_version": None,
    "created": None,
    "report_dir": None,
    "source": ("kind", "path", "step", "which", "weights"),
    "runtime": ("runtime", "provider", "precision"),
    "model": (
        "name",
        "model_kwargs",
        "dtype",
        "params",
        "gflops",
        "resolution",
        "stem_params",
        "head_params",
        "stages",
        "table",
    ),
    "preprocessing": ("resize_size", "crop_size", "mean", "std", "interpolation"),
    "dataset": ("name", "split", "examples", "num_classes", "batch_size", "devices"),
    "accuracy": ("top1", "top5", "loss", "count", "correct", "correct_top5", "seconds"),
    "per_class": ("class", "name", "count", "correct", "accuracy", "most_confused_with", "confused_count"),
    "confusion_matrix": ("png", "csv", "rows", "columns", "counts"),
    "calibration": ("ece", "bin_count", "bins", "png"),
    "training_curves": None,
    "speed": ("device", "platform", "dtype", "resolution", "runs"),
    "memory": ("kind", "device", "peak_bytes", "bytes_limit"),
    "config": None,
    "provenance": ("versions", "python", "platform", "backend", "process_count", "devices", "git", "native_kernels"),
}
SPEED_RUN_FIELDS = (
    "batch_size",
    "compile_s",
    "iterations",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_mean",
    "images_per_s",
)
CALIBRATION_BIN_FIELDS = ("lower", "upper", "count", "confidence", "accuracy")
NATIVE_FIELDS = ("available", "isa", "unavailable_reason", "build", "used", "not_used", "ran", "targets")
STAGE_FIELDS = ("name", "blocks", "groups", "bottleneck_width", "out_channels", "out_size", "params")


def test_report_holds_every_field_and_docs_explain_them(workdir, tmp_path, capsys):
    out = tmp_path / "report"
    code = run_cli(
        evaluate_main,
        [workdir, "--which", "latest", "--batch-sizes", "1,4", "--min-seconds", "0.05", "--out", str(out)],
    )
    stdout = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == set(REPORT_FIELDS)
    for key, fields in REPORT_FIELDS.items():
        if fields:
            section = report[key][0] if key == "per_class" else report[key]
            assert set(section) == set(fields), key
    assert [set(run) for run in report["speed"]["runs"]] == [set(SPEED_RUN_FIELDS)] * 2
    assert set(report["provenance"]["native_kernels"]) == set(NATIVE_FIELDS)
    assert set(report["model"]["stages"][0]) == set(STAGE_FIELDS)

    # The values: the logged eval of step 44, every example once, the run's own config, this environment.
    record = logged(workdir, "eval", 44)
    assert report["accuracy"]["correct"] == round(record["top1"] * 360) and f"{record['top1']:.2%}" in stdout
    assert sum(row["count"] for row in report["per_class"]) == report["dataset"]["examples"] == 360
    assert sum(row["correct"] for row in report["per_class"]) == report["accuracy"]["correct"]
    counts = np.asarray(report["confusion_matrix"]["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 360
    np.testing.assert_array_equal(np.loadtxt(out / "confusion_matrix.csv", delimiter=",", dtype=int), counts)
    assert [run["batch_size"] for run in report["speed"]["runs"]] == [1, 4]
    for run in report["speed"]["runs"]:
        assert 0 < run["latency_ms_p50"] <= run["latency_ms_p95"] and run["compile_s"] > 0 and run["iterations"] >= 5
    assert report["memory"]["peak_bytes"] > 2**20
    with open(os.path.join(workdir, "config.json")) as f:
        assert report["config"] == json.load(f)
    assert report["model"]["params"] == sum(
        x.size for x in jax.tree.leaves(resnext_jax.load_model(workdir).variables["params"])
    )
    provenance = report["provenance"]
    assert provenance["versions"]["jax"] == jax.__version__
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(__file__),
        timeout=60,
    ).stdout.strip()
    assert provenance["git"]["commit"] == head
    native = provenance["native_kernels"]
    assert native["ran"] == bool(native["targets"]) == (jax.default_backend() == "cpu" and native["available"])

    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in markdown and f"{record['top1']:.2%}" in markdown
    # The run's training curves (resnext_jax.plot) beside it: a drawn figure, not a blank canvas.
    assert report["training_curves"] == "training_curves.png" and "![training curves]" in markdown
    curves = np.asarray(Image.open(out / "training_curves.png").convert("L"), np.float32)
    assert curves.var() > 300

    with open(DOCS) as f:
        documented = set(re.findall(r"`([a-z0-9_]+)`", f.read()))
    fields = set(REPORT_FIELDS) | {f for fs in REPORT_FIELDS.values() if fs for f in fs}
    fields |= set(SPEED_RUN_FIELDS) | set(NATIVE_FIELDS) | set(STAGE_FIELDS) | set(CALIBRATION_BIN_FIELDS)
    assert fields - documented == set(), "document these report fields in docs/inference.md"


def test_speed_off_writes_no_speed_section_and_calibration_matches_the_predictions(workdir, tmp_path, capsys):
    """--speed off: the accuracy pass only. The report's ECE equals one recomputed here from the model's softmax
    on the same eval split (module.apply on each batch, not evaluate's shard_map step)."""
    from resnext_jax.data import create_eval_loader
    from resnext_jax.inference.calibration import calibration

    out = tmp_path / "off"
    assert run_cli(evaluate_main, [workdir, "--which", "latest", "--speed", "off", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert "speed" not in report and "batch 1:" not in stdout and "## Speed" not in (out / "report.md").read_text()
    assert set(report) == set(REPORT_FIELDS) - {"speed"}
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![reliability diagram](reliability.png)" in (out / "report.md").read_text()
    assert sum(row["count"] for row in report["calibration"]["bins"]) == 360
    assert set(report["calibration"]["bins"][0]) == set(CALIBRATION_BIN_FIELDS)

    loaded = resnext_jax.load_model(workdir, which="latest")
    pre = loaded.preprocessing
    confidences, correct = [], []
    loader = create_eval_loader(
        "digits", batch_size=120, image_size=pre.crop_size, resize_size=pre.resize_size, mean=pre.mean, std=pre.std
    )
    for batch in loader:
        mask = np.asarray(batch["mask"])
        logits = loaded.module.apply(loaded.variables, batch["image"], train=False)
        probabilities = np.asarray(jax.nn.softmax(logits.astype(np.float32)))[mask]
        confidences.append(probabilities.max(-1))
        correct.append(probabilities.argmax(-1) == np.asarray(batch["label"])[mask])
    expected = calibration(np.concatenate(confidences), np.concatenate(correct))
    assert report["calibration"]["ece"] == pytest.approx(expected["ece"], abs=1e-4)
    assert f"expected calibration error {report['calibration']['ece']:.2%}" in stdout


def test_evaluate_errors_are_one_line(workdir, tmp_path, capsys):
    code = run_cli(evaluate_main, [workdir, "--dataset", "cifar100", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(UserError, match="has no split 'nope'"):
        evaluate_accuracy(resnext_jax.load_model(workdir), "digits", split="nope")


def test_two_devices_count_every_example_once_with_the_same_predictions(workdir):
    """Accuracy over all local devices: two simulated CPU devices split each batch, every example still counts
    once, and the confusion matrix equals the one-device pass (the logged top-1)."""
    script = (
        "import json, jax, resnext_jax\n"
        "from resnext_jax.inference.evaluation import evaluate_accuracy\n"
        "assert jax.device_count() == 2\n"
        f"result = evaluate_accuracy(resnext_jax.load_model({workdir!r}, which='latest'), 'digits')\n"
        "print(json.dumps({'devices': result['devices'], 'count': result['count'],\n"
        "                  'confusion': result['confusion'].tolist()}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads(result.stdout.strip().splitlines()[-1])
    one = evaluate_accuracy(resnext_jax.load_model(workdir, which="latest"), "digits")
    assert two["devices"] == 2 and two["count"] == 360
    np.testing.assert_array_equal(np.asarray(two["confusion"]), one["confusion"])


def test_a_step_whose_arrays_fail_their_checksums_is_never_loaded(workdir, tmp_path):
    """One wrong CRC in the trainer's `checksums` item (as a bit flip in that array would give) refuses the step,
    naming it, the array and the steps left."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    path = copy / "checkpoints" / "44" / "checksums" / "metadata"
    sums = json.loads(path.read_text()) if path.exists() else {}
    sums[".params['fc']['bias']"] = "00000000 float32 [10]"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(sums))
    with pytest.raises(UserError, match=r"step 44 .* fails its checksums .*\.params\['fc'\]\['bias'\].*\[22\]"):
        resnext_jax.load_model(str(copy), which="latest")
    assert resnext_jax.load_model(str(copy), which=22).source["step"] == 22
