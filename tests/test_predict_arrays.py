"""`LoadedModel.predict` and `.features` on images in memory, against the predict command line on the same files."""

import json
import os

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image
from test_training import tiny_config

from resnext_jax.errors import InputError, UserError, run_cli
from resnext_jax.inference import load_model
from resnext_jax.predict import main as predict_main
from resnext_jax.training import train_and_evaluate

pytestmark = pytest.mark.slow  # every test here uses the module's training run


@pytest.fixture(scope="module")
def run_and_files(tmp_path_factory):
    """The tiny digits model after one epoch, and eight digit scans as files: gray PNGs, RGB PNGs and JPEGs."""
    root = tmp_path_factory.mktemp("arrays")
    workdir = str(root / "run")
    train_and_evaluate(tiny_config(num_epochs=1), workdir)
    digits = sklearn.datasets.load_digits()
    paths = []
    for index in range(8):
        gray = (digits.images[100 + index] * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(gray).resize((24, 24), Image.NEAREST)
        if index % 2:
            image = image.convert("RGB")
        path = str(root / f"{index}.{'jpg' if index % 4 == 3 else 'png'}")
        image.save(path)
        paths.append(path)
    return workdir, paths


def test_predict_on_arrays_pil_and_paths_equals_the_command_line(run_and_files, capsys):
    workdir, paths = run_and_files
    assert run_cli(predict_main, [workdir, *paths, "--json", "--top-k", "3"]) == 0
    cli = {}
    for line in capsys.readouterr().out.splitlines():
        record = json.loads(line)
        cli[record["path"]] = [(entry["name"], entry["probability"]) for entry in record["top_k"]]
    expected = [cli[path] for path in paths]

    loaded = load_model(workdir)
    uint8 = [np.asarray(Image.open(path)) for path in paths]  # (24, 24) gray and (24, 24, 3) RGB
    inputs = {
        "paths": paths,
        "PIL images": [Image.open(path) for path in paths],
        "uint8 arrays": uint8,
        "float arrays in 0..1": [array.astype(np.float32) / 255 for array in uint8],
    }
    for kind, images in inputs.items():
        results = loaded.predict(images, top_k=3)
        assert [r[0][0] for r in results] == [e[0][0] for e in expected], kind
        for got, want in zip(results, expected):
            assert [name for name, _ in got] == [name for name, _ in want], kind
            np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5, err_msg=kind)
    # A batch array and a single image take the same path.
    rgb = np.stack([np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in uint8])
    assert [r[0][0] for r in loaded.predict(rgb, top_k=1)] == [e[0][0] for e in expected]
    assert loaded.predict(uint8[0], top_k=1)[0][0][0] == expected[0][0][0]
    # Jitted once per model, compiled once per batch size: 8 then 1 images are two shapes, another 8 none new.
    loaded.predict(uint8[::-1], top_k=1)
    assert loaded._jitted["probabilities"]._cache_size() == 2


def test_features_are_the_stages_the_head_reads(run_and_files):
    """pre_logits is the global average of the last stage, and the head on it gives predict's probabilities."""
    workdir, paths = run_and_files
    loaded = load_model(workdir)
    features = loaded.features(paths[:3])
    assert sorted(features) == ["pre_logits", "stage1"]  # tiny_config has one stage
    assert features["stage1"].shape[0] == 3 and features["stage1"].ndim == 4
    np.testing.assert_allclose(features["pre_logits"], features["stage1"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    head = loaded.variables["params"]["fc"]
    logits = features["pre_logits"] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    names = loaded.preprocessing.class_names
    for row, result in zip(probabilities, loaded.predict(paths[:3], top_k=2)):
        assert [(names[i], pytest.approx(float(row[i]), abs=1e-5)) for i in np.argsort(-row)[:2]] == result


@pytest.mark.parametrize(
    "image, match",
    [
        (np.full((8, 8, 3), 2.0, np.float32), r"float images must be in 0..1 \(divide by 255"),
        (np.zeros((8, 8, 5), np.uint8), r"shape \(8, 8, 5\); pass one image as \(height, width, 3\)"),
        (np.full((8, 8), 300, np.int32), "outside 0..255; pass uint8 pixels"),
    ],
)
def test_arrays_the_model_cannot_read_are_refused_with_the_fix(run_and_files, image, match):
    with pytest.raises(InputError, match=match):
        load_model(run_and_files[0]).predict(image)


def test_a_missing_file_names_itself(run_and_files, tmp_path):
    missing = str(tmp_path / "nope.png")
    with pytest.raises(UserError, match=f"{missing}: cannot read the file"):
        load_model(run_and_files[0]).predict([missing])
    assert os.path.exists(run_and_files[1][0])


def test_features_of_an_exported_file_ask_for_the_workdir(run_and_files):
    import dataclasses

    from resnext_jax.inference.from_artifact import ArtifactModule

    loaded = load_model(run_and_files[0])
    module = ArtifactModule(run=None, exported=None, batch=None, num_classes=10, inside=False, mean=(0,), std=(1,))
    exported = dataclasses.replace(loaded, module=module, source={"kind": "onnx", "path": "model.onnx"})
    with pytest.raises(UserError, match="model.onnx is an exported file that only gives logits; load the training"):
        exported.features(run_and_files[1][:1])
