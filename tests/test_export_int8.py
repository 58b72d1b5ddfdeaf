"""int8 ONNX and running exported files (issue 30), on a trained quick-start run: the sidecar's int8 top-1 is what
`evaluate` measures on the int8 file, predict on the ONNX and StableHLO files gives the workdir's classes, and each
bad input is one line that names the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnext_jax
from resnext_jax.errors import UserError, run_cli
from resnext_jax.evaluate import main as evaluate_main
from resnext_jax.export import __main__ as export_cli
from resnext_jax.export import export
from resnext_jax.inference import LoadedModel, Preprocessing, predict_files
from resnext_jax.inference.evaluation import evaluate_accuracy
from resnext_jax.training import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart_config(**changes):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "configs", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_epochs = 3  # about 95 % eval top-1; the full 8 epochs reach 98-99 %
    config.progress_bar = False
    config.write_report = False
    for key, value in changes.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quickstart")
    train_and_evaluate(_quickstart_config(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def int8_file(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "quickstart.int8.onnx"
    argv = [workdir, "--format", "onnx", "--out", str(out), "--quantize", "int8", "--calibrate", "digits"]
    assert run_cli(export_cli.main, [*argv, "--calibration-images", "256"]) == 0
    return out


@pytest.mark.slow  # trains the quick start for 3 epochs (about 40 s on 2 cores), shared by the module
def test_int8_sidecar_top1_equals_evaluate_on_the_int8_file(workdir, int8_file, tmp_path, capsys):
    sidecar = json.loads((int8_file.parent / (int8_file.name + ".json")).read_text())
    int8 = sidecar["int8"]
    assert sidecar["precision"] == "int8" and int8["dataset"] == "digits" and int8["split"] == "test"
    assert int8["calibration"] == {"dataset": "digits", "split": "train", "images": 256}
    assert int8["drop_points"] <= int8["max_drop"] == 1.0
    # The float32 file is the trained model: its top-1 is the workdir's to the image.
    assert abs(int8["float32_top1"] - evaluate_accuracy(resnext_jax.load_model(workdir), "digits")["top1"]) < 1e-9
    argv = [str(int8_file), "--dataset", "digits", "--out", str(tmp_path / "report"), "--batch-sizes", "2"]
    assert run_cli(evaluate_main, [*argv, "--min-seconds", "0.05"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["accuracy"]["top1"] == int8["int8_top1"]
    assert report["accuracy"]["count"] == int8["count"] == 360
    assert report["runtime"] == {"runtime": "onnxruntime", "provider": "CPUExecutionProvider", "precision": "int8"}
    assert report["source"]["kind"] == "onnx" and report["source"]["sha256"] == sidecar["sha256"]
    assert "Runtime: onnxruntime (CPUExecutionProvider), int8." in (tmp_path / "report" / "report.md").read_text()
    print(f"float32 {int8['float32_top1']:.4f}, int8 {int8['int8_top1']:.4f}, drop {int8['drop_points']:.2f}")


@pytest.mark.slow
def test_predict_on_onnx_and_stablehlo_gives_the_workdirs_classes(workdir, int8_file, tmp_path):
    from resnext_jax.data.datasets import open_source

    source = open_source("digits", "test")
    paths = []
    for index in range(24):
        path = tmp_path / f"{index}.png"
        path.write_bytes(source[index]["image"])
        paths.append(str(path))
    expected = [r.top_k[0][0] for r in predict_files(resnext_jax.load_model(workdir), paths, top_k=1, batch_size=8)]
    loaded = resnext_jax.load_model(workdir)
    export(loaded, tmp_path / "q.onnx", format="onnx", with_preprocessing=True)  # uint8 in, normalized inside
    export(loaded, tmp_path / "q.stablehlo", format="stablehlo", batch=5)  # a fixed batch: predict pads to it
    for artifact in ("q.onnx", "q.stablehlo"):
        served = resnext_jax.load_model(str(tmp_path / artifact))
        assert served.preprocessing == loaded.preprocessing
        got = [r.top_k[0][0] for r in predict_files(served, paths, top_k=1, batch_size=8)]
        assert got == expected, artifact
    int8 = resnext_jax.load_model(str(int8_file))
    got = [r.top_k[0][0] for r in predict_files(int8, paths, top_k=1, batch_size=8)]
    assert sum(a == b for a, b in zip(got, expected)) >= len(expected) - 2  # int8 may flip a close call


@pytest.mark.slow
def test_a_drop_above_max_drop_writes_nothing_and_says_how_to_override(workdir, tmp_path, monkeypatch, capsys):
    from resnext_jax.inference import evaluation

    real, calls = evaluation.evaluate_accuracy, []

    def worse_int8(model, *args, **kwargs):  # the second call measures the int8 file: 5 points worse
        result = dict(real(model, *args, **kwargs))
        calls.append(result)
        if len(calls) == 2:
            result["top1"] = calls[0]["top1"] - 0.05
        return result

    monkeypatch.setattr(evaluation, "evaluate_accuracy", worse_int8)
    out = tmp_path / "q.onnx"
    argv = [workdir, "--format", "onnx", "--out", str(out), "--quantize", "int8", "--calibrate", "digits:train"]
    assert run_cli(export_cli.main, [*argv, "--calibration-images", "64"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the exporter's progress line, then the error
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1 and error[0] == lines[-1]
    assert "5.00 points below float32" in error[0] and "above --max-drop 1;" in error[0]
    assert "nothing was written. Pass --max-drop 5 to accept it" in error[0]
    assert not out.exists() and not (tmp_path / "q.onnx.json").exists()


def _random_tiny(num_classes: int, crop: int) -> LoadedModel:
    module = resnext_jax.create_model("resnet18", stage_sizes=(1,), num_filters=8, num_classes=num_classes)
    variables = module.init(jax.random.key(0), jnp.zeros((1, crop, crop, 3)), train=False)
    names = tuple(str(label) for label in range(num_classes))
    pre = Preprocessing(crop, crop, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), names)
    return LoadedModel("resnet18", module, variables, pre, {"kind": "test"}, None, {})


@pytest.mark.parametrize(
    "classes,crop,message",
    [
        (5, 32, r"calibration set digits has 10 classes, other than the model's 5 .* calibrate on the dataset"),
        (10, 224, r"calibration set digits holds 32-pixel images, the model takes 224; calibrate on images like"),
    ],
)
def test_a_calibration_set_of_other_classes_or_size_is_one_line(tmp_path, classes, crop, message):
    loaded = _random_tiny(classes, crop)
    with pytest.raises(UserError, match=message):
        export(loaded, tmp_path / "m.onnx", format="onnx", quantize="int8", calibrate="digits")
    assert list(tmp_path.iterdir()) == []


def test_an_artifact_without_its_sidecar_is_one_line(tmp_path):
    loaded = _random_tiny(10, 32)
    export(loaded, tmp_path / "m.onnx", format="onnx")
    shutil.copy(tmp_path / "m.onnx", tmp_path / "moved.onnx")
    with pytest.raises(UserError, match=r"moved\.onnx has no sidecar .*moved\.onnx\.json.* or export again"):
        resnext_jax.load_model(str(tmp_path / "moved.onnx"))
    served = resnext_jax.load_model(str(tmp_path / "m.onnx.json"))  # the sidecar names its file too
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    expected = loaded.module.apply(loaded.variables, images, train=False)
    assert np.max(np.abs(np.asarray(served.module.apply({}, images)) - np.asarray(expected))) < 1e-4


def test_bf16_on_a_cpu_is_one_line_with_the_cost_and_the_alternative(tmp_path, capsys, monkeypatch):
    import dataclasses

    from PIL import Image

    from resnext_jax.precision import bf16_cpu_note
    from resnext_jax.predict import main as predict_main

    assert bf16_cpu_note(jnp.float32, "training") is None and bf16_cpu_note("int8", "evaluate") is None
    assert bf16_cpu_note(jnp.bfloat16, "training").endswith("train in float32 with --config.half_precision=False")
    loaded = _random_tiny(10, 32)
    loaded = dataclasses.replace(loaded, module=loaded.module.clone(dtype=jnp.bfloat16))
    monkeypatch.setattr(resnext_jax.inference, "load_model", lambda *args, **kwargs: loaded)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "black.png")
    assert run_cli(predict_main, ["run", str(tmp_path / "black.png")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: predict in bfloat16")]
    assert len(notes) == 1 and "slower than float32" in notes[0] and "--quantize int8" in notes[0]


@pytest.mark.slow
def test_int8_with_the_preprocessing_inside_calibrates_on_uint8_pixels(workdir, tmp_path):
    out = tmp_path / "q.int8.onnx"
    loaded = resnext_jax.load_model(workdir)
    metadata = export(
        loaded,
        out,
        format="onnx",
        with_preprocessing=True,
        quantize="int8",
        calibrate="digits",
        calibration_images=128,
    )
    assert metadata["input"]["dtype"] == "uint8" and metadata["int8"]["drop_points"] <= 1.0
    assert evaluate_accuracy(resnext_jax.load_model(str(out)), "digits")["top1"] == metadata["int8"]["int8_top1"]
