"""Export for serving (issue 20): every artifact is checked against `model.apply` of the module it came from.

The StableHLO artifacts run in a fresh Python process that imports only jax and numpy, so an artifact that needed
resnext_jax (our native kernels are custom calls registered only when it is imported) would fail there. Models
are random-init torchvision-shaped ones with randomized BatchNorm statistics (random init alone leaves mean 0 and
var 1, behind which a wrong normalization would hide). Their heads are scaled to logits of std
about 2, as a trained classifier's; errors are judged as max-abs error over max(1, std of the logits), as the
exporter's own check does (`resnext_jax.export.common.TOLERANCE`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import create_model
from resnext_jax.errors import UserError, run_cli
from resnext_jax.export import __main__ as cli
from resnext_jax.export import common, export, load
from resnext_jax.inference.loader import (
    LoadedModel,
    Preprocessing,
    imagenet_class_names,
)

MODELS = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf"]
FAST = {("resnet18", 97)}  # the rest run in CI (-m slow)
ODD = 97
# The StableHLO artifact embeds the weights as constants, so checking it costs a compile per batch size that grows
# with the parameter count (wide_resnet50_2's 69 M: 15 s each, three of them, at any resolution). One builder runs
# at 224 as well as 97; wide_resnet50_2, resnet50's graph at twice the width, is checked through ONNX below.
STABLEHLO_CASES = [(name, ODD) for name in MODELS if name != "wide_resnet50_2"] + [("resnet18", 224)]


def _random_model(name: str, seed: int = 0, **fields) -> LoadedModel:
    module = create_model(name, **fields)
    variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        if path[-1].key == "mean":
            return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)

    if "batch_stats" in variables:
        variables = {**variables, "batch_stats": jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])}
    # A trained classifier's logits have a std of about 2; random heads give anything from 0.1 to 200, which would
    # make an absolute tolerance either meaningless or unreachable. Scale the head as tests/torch_reference.py does.
    probe = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    scale = 2.0 / float(jnp.std(jax.jit(functools.partial(module.apply, train=False))(variables, probe)))
    head = jax.tree.map(lambda leaf: leaf * scale, variables["params"]["fc"])
    variables = {**variables, "params": {**variables["params"], "fc": head}}
    pre = Preprocessing(
        resize_size=232,
        crop_size=224,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        class_names=imagenet_class_names(),
    )
    return LoadedModel(
        name=name,
        module=module,
        variables=variables,
        preprocessing=pre,
        source={"kind": "test"},
        config=None,
        model_kwargs=fields,
    )


@functools.cache
def _model(name: str) -> LoadedModel:
    return _random_model(name)


def _apply(loaded: LoadedModel, images: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(functools.partial(loaded.module.apply, train=False))(loaded.variables, images))


def _assert_close(got, expected, tolerance):
    scale = max(1.0, float(np.std(expected)))
    error = float(np.max(np.abs(np.asarray(got) - expected)))
    print(f"max-abs error {error:.3g}, logit scale {scale:.3g}")  # shown with -rP, for docs/export.md
    assert error <= tolerance * scale, f"max-abs error {error:.3g} above {tolerance:.0e} x logit scale {scale:.3g}"


FRESH = r"""
import json, sys
import jax, numpy as np
jobs = json.loads(sys.argv[1])
report = {}
for artifact, inputs, output in jobs:
    with open(artifact, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    batches = np.load(inputs)
    np.savez(output, **{key: np.asarray(exported.call(batches[key])) for key in batches.files})
    report[artifact] = {"platforms": list(exported.platforms), "module": exported.mlir_module()}
report["imported"] = sorted(name for name in sys.modules if name.startswith("resnext_jax"))
print(json.dumps(report))
"""


def _run_fresh(tmp_path, jobs) -> dict:
    """Runs each (artifact, {name: images}) in a process that imports only jax and numpy; returns the outputs."""
    spec = []
    for index, (artifact, batches) in enumerate(jobs):
        np.savez(tmp_path / f"in{index}.npz", **batches)
        spec.append((str(artifact), str(tmp_path / f"in{index}.npz"), str(tmp_path / f"out{index}.npz")))
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(spec)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report.pop("imported") == []
    for artifact, _, output in spec:
        report[artifact]["outputs"] = dict(np.load(output))
    return report


@pytest.mark.parametrize(
    "name,resolution",
    [
        pytest.param(name, size, marks=() if (name, size) in FAST else pytest.mark.slow)
        for name, size in STABLEHLO_CASES
    ],
)
def test_stablehlo_runs_with_only_jax_and_matches_apply(tmp_path, name, resolution):
    loaded = _model(name)
    artifact = tmp_path / f"{name}.stablehlo"
    metadata = export(loaded, artifact, format="stablehlo", resolution=resolution)
    assert metadata["input"]["shape"] == [None, resolution, resolution, 3]
    assert metadata["platforms"] == ["cpu", "cuda"], metadata["platforms_note"]
    images = np.random.default_rng(1).standard_normal((7, resolution, resolution, 3)).astype(np.float32)
    report = _run_fresh(tmp_path, [(artifact, {"b1": images[:1], "b7": images})])[str(artifact)]  # one artifact
    assert common.our_custom_calls(report["module"]) == []
    expected = _apply(loaded, images)  # eval mode: image 0's logits do not depend on the rest of the batch
    _assert_close(report["outputs"]["b1"], expected[:1], 1e-5)
    _assert_close(report["outputs"]["b7"], expected, 1e-5)


def test_our_custom_calls_are_found_in_module_text():
    text = (
        "%0 = stablehlo.custom_call @resnext_jax_grouped_conv_forward(%arg0) : ...\n"
        "%1 = stablehlo.custom_call @Sharding(%0)\n"
        '"stablehlo.custom_call"(%1) {call_target_name = "resnext_jax_affine_add_relu"}'
    )
    assert common.our_custom_calls(text) == ["resnext_jax_affine_add_relu", "resnext_jax_grouped_conv_forward"]
    from resnext_jax import cpu

    if cpu.available():  # the module as trained (conv_impl='auto') calls them; the export must not
        module = create_model("resnext50_32x4d", stage_sizes=(1, 1, 1, 1), num_classes=10)
        variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
        lowered = jax.jit(module.apply).lower(variables, jnp.zeros((1, 64, 64, 3)))
        assert common.our_custom_calls(lowered.as_text())


@pytest.mark.slow  # the fast suite checks ONNX at 63x63 and 64x64 below
@pytest.mark.parametrize("name", MODELS)
def test_onnx_in_onnxruntime_matches_jax(tmp_path, name):
    loaded = _model(name)
    metadata = export(loaded, tmp_path / f"{name}.onnx", format="onnx")
    assert metadata["parity"]["max_abs_error"] <= metadata["parity"]["tolerance"]
    served = load(tmp_path / f"{name}.onnx")
    rng = np.random.default_rng(2)
    for size in (1, 5):
        images = rng.standard_normal((size, 224, 224, 3)).astype(np.float32)
        _assert_close(served(images), _apply(loaded, images), 1e-4)


@pytest.fixture(scope="module")
def small_artifacts(tmp_path_factory):
    """resnet18 at 63x63 (an odd size) with the preprocessing inside, in both formats."""
    directory = tmp_path_factory.mktemp("small")
    loaded = _model("resnet18")
    paths = {}
    for fmt in ("stablehlo", "onnx"):
        paths[fmt] = directory / f"small.{fmt}"
        export(loaded, paths[fmt], format=fmt, resolution=63, with_preprocessing=True)
    return loaded, paths


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_with_preprocessing_uint8_gives_the_float_pipelines_logits(small_artifacts, fmt):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from resnext_jax.inference import images as image_io

    loaded, paths = small_artifacts
    served = load(paths[fmt])
    assert served.preprocessing["inside"] and served.metadata["input"]["dtype"] == "uint8"
    assert served.class_names == loaded.preprocessing.class_names
    pre = served.preprocessing
    photos = np.stack(
        [
            image_io.preprocess(Image.fromarray(photo), pre["resize_size"], pre["crop_size"])
            for photo in load_sample_images().images
        ]
    )
    normalized = image_io.normalize(photos, pre["mean"], pre["std"])  # what predict and evaluate feed the model
    _assert_close(served(photos), _apply(loaded, normalized), 1e-5 if fmt == "stablehlo" else 1e-4)
    with pytest.raises(UserError, match="uint8"):
        served(normalized)


def test_load_names_the_file_and_the_fix(small_artifacts, tmp_path):
    _, paths = small_artifacts
    original = paths["stablehlo"].read_bytes()
    sidecar = json.loads((paths["stablehlo"].parent / "small.stablehlo.json").read_text())

    broken = tmp_path / "broken.stablehlo"
    broken.write_bytes(original[: len(original) // 2])
    (tmp_path / "broken.stablehlo.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match=r"broken\.stablehlo does not match its sidecar .* damaged .* export it"):
        load(broken)

    garbage = tmp_path / "garbage.stablehlo"  # a sidecar that vouches for a file jax cannot read
    garbage.write_bytes(b"not a flatbuffer" * 64)
    (tmp_path / "garbage.stablehlo.json").write_text(json.dumps({**sidecar, "sha256": common.sha256(garbage)}))
    with pytest.raises(UserError, match=r"cannot deserialize .*garbage\.stablehlo.* export it again"):
        load(garbage)

    foreign = tmp_path / "model.onnx"
    foreign.write_bytes(b"\x08\x07")
    with pytest.raises(UserError, match=r"model\.onnx has no sidecar .*model\.onnx\.json.* export again"):
        load(foreign)
    (tmp_path / "model.onnx.json").write_text('{"producer": "someone else"}')
    with pytest.raises(UserError, match=r"model\.onnx\.json is not a resnext-jax export sidecar"):
        load(foreign)
    with pytest.raises(UserError, match=r"missing\.onnx does not exist"):
        load(tmp_path / "missing.onnx")


def test_exporter_writes_nothing_that_misses_jax(tmp_path, monkeypatch):
    loaded = _model("resnet18")
    real = common.reference_function
    monkeypatch.setattr(common, "reference_function", lambda *args: lambda images: real(*args)(images) + 1e-2)
    for fmt in ("stablehlo", "onnx"):
        with pytest.raises(UserError, match="does not reproduce JAX's logits: max-abs error 0.01"):
            export(loaded, tmp_path / f"m.{fmt}", format=fmt, resolution=32)
    assert list(tmp_path.iterdir()) == []


def test_onnx_refuses_a_custom_block_by_name(tmp_path):
    from resnext_jax.models import Bottleneck

    class MyBlock(Bottleneck):
        pass

    loaded = dataclasses.replace(_model("resnet18"), module=create_model("resnet50", block_cls=MyBlock))
    with pytest.raises(UserError, match=r"not block_cls=MyBlock; export this model with --format stablehlo"):
        export(loaded, tmp_path / "m.onnx", format="onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_onnx_writer_knows_every_registry_model():
    """A family or block class added to the registry without an ONNX form fails here, not at a user's export."""
    from resnext_jax import list_models
    from resnext_jax.export.onnx_graph import supported_problems

    assert {name: supported_problems(create_model(name)) for name in list_models()} == {
        name: [] for name in list_models()
    }


def test_quantize_with_stablehlo_is_one_line(tmp_path, capsys):
    argv = ["runs/x", "--format", "stablehlo", "--out", str(tmp_path / "m.stablehlo"), "--quantize", "int8"]
    assert run_cli(cli.main, argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["error: --quantize int8 needs --format onnx (StableHLO artifacts are float32 or bfloat16)"]
    with pytest.raises(UserError, match="--quantize int8 is for --format onnx"):
        export(_model("resnet18"), tmp_path / "m.stablehlo", format="stablehlo", quantize="int8")


@pytest.mark.slow
def test_stablehlo_bfloat16_matches_bfloat16_apply(tmp_path):
    loaded = _model("resnet18")
    export(loaded, tmp_path / "bf16.stablehlo", format="stablehlo", resolution=64, dtype="bfloat16")
    served = load(tmp_path / "bf16.stablehlo")
    images = np.random.default_rng(3).standard_normal((3, 64, 64, 3)).astype(np.float32)
    expected = np.asarray(loaded.module.clone(dtype=jnp.bfloat16).apply(loaded.variables, images, train=False))
    _assert_close(served(images), expected, 1e-1)  # bfloat16's own reproducibility, see common.TOLERANCE
    float32 = _apply(loaded, images)
    assert np.max(np.abs(served(images) - float32)) > 1e-4 * np.std(float32)  # it does compute in bfloat16
    assert served.metadata["compute_dtype"] == "bfloat16" and served.metadata["input"]["dtype"] == "float32"


def test_cli_exports_torchvision_weights_with_a_fixed_batch(tmp_path, capsys):
    import torch

    from resnext_jax.convert import to_torchvision

    loaded = _model("resnet18")
    torch.save(to_torchvision("resnet18", loaded.variables), tmp_path / "r18.pth")
    out = tmp_path / "r18.onnx"
    argv = [
        str(tmp_path / "r18.pth"),
        "--model",
        "resnet18",
        "--format",
        "onnx",
        "--out",
        str(out),
        "--batch",
        "3",
        "--resolution",
        "64",
    ]
    assert run_cli(cli.main, argv) == 0
    assert "wrote" in capsys.readouterr().out
    served = load(out)
    assert served.metadata["input"]["shape"] == [3, 64, 64, 3] and served.preprocessing["resize_size"] == 73
    images = np.random.default_rng(4).standard_normal((3, 64, 64, 3)).astype(np.float32)
    _assert_close(served(images), _apply(loaded, images), 1e-4)
    with pytest.raises(UserError, match="exported for batch 3, not 2"):
        served(images[:2])

    assert run_cli(cli.main, argv + ["--dtype", "bfloat16"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [error[0]] and error[0].startswith("error: ONNX export is float32 only (")  # one line


def test_load_model_runs_an_artifact_with_its_sidecars_preprocessing(small_artifacts):
    """load_model on either file: the normalized float batch predict and evaluate build gives the float model's
    logits (the uint8 pixels are recovered exactly inside), with the sidecar's sizes and names."""
    from resnext_jax import load_model
    from resnext_jax.inference.from_artifact import runtime_fields

    loaded, paths = small_artifacts
    pixels = np.random.default_rng(5).integers(0, 256, (3, 63, 63, 3), dtype=np.uint8)
    from resnext_jax.inference import images as image_io

    normalized = image_io.normalize(pixels, loaded.preprocessing.mean, loaded.preprocessing.std)
    for fmt, path in paths.items():
        artifact = load_model(str(path), model="ignored")
        assert artifact.preprocessing.crop_size == 63 and artifact.preprocessing.resize_size == 65
        assert artifact.preprocessing.class_names == loaded.preprocessing.class_names
        got = jax.jit(lambda images, artifact=artifact: artifact.module.apply({}, images))(normalized)
        _assert_close(got, _apply(loaded, normalized), 1e-5 if fmt == "stablehlo" else 1e-4)
        fields = runtime_fields(artifact)
        assert fields == (
            {"runtime": "onnxruntime", "provider": "CPUExecutionProvider", "precision": "float32"}
            if fmt == "onnx"
            else {"runtime": "jax (StableHLO)", "provider": "cpu", "precision": "float32"}
        )
    assert runtime_fields(loaded) == {"runtime": "jax", "provider": "cpu", "precision": "float32"}


def test_a_file_that_is_not_onnx_or_stablehlo_is_one_line(tmp_path):
    from resnext_jax import load_model

    for name in ("notes.onnx", "notes.stablehlo"):
        (tmp_path / name).write_text("just text")
        kind = "ONNX" if name.endswith("onnx") else "StableHLO"
        with pytest.raises(UserError, match=rf"{name} is not an {kind} file .* python -m resnext_jax.export"):
            load_model(str(tmp_path / name))
