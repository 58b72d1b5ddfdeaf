"""ONNX for every model without torch (issue 30): the writer's file in onnxruntime equals `model.apply` to 1e-4
(times max(1, std of the logits), as the exporter's own check), at batch 1 and 5 with one file.

Everything runs in a subprocess whose import system refuses torch and torchvision, so a route through torch fails
here. Models are random with randomized BatchNorm statistics and affine parameters (identity statistics would hide
a wrong fold), small images (16-64 px). One subprocess per group shares the Python and JAX start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = dict(stage_sizes=(1, 1), num_filters=16, cardinality=8, bottleneck_width=16, small_stem=True)
TINY = dict(stage_sizes=(1, 2), num_filters=8)  # resnet18's blocks, two stages, so each field's case is cheap

# (case id, builder, create_model fields, resolution)
FIELD_CASES = [
    ("quickstart", "resnext50_32x4d", {**QUICKSTART, "num_classes": 10}, 16),
    ("silu_se_small_stem", "resnet18", {**TINY, "activation": "silu", "se_ratio": 0.25, "small_stem": True}, 32),
    ("gelu_group_norm", "resnet18", {**TINY, "activation": "gelu", "norm": "group", "norm_groups": 4}, 32),
    ("frozen_batch_dropout", "resnet18", {**TINY, "norm": "frozen_batch", "dropout_rate": 0.5}, 32),
    ("deep_stem_avg_down", "resnet50", {**TINY, "stem_type": "deep", "stem_width": 8, "avg_down": True}, 32),
    ("tiered_stem_odd_size", "resnet50", {**TINY, "stem_type": "deep_tiered", "stem_width": 16, "avg_down": True}, 37),
    (
        "scan_blocks_drop_path",
        "resnext50_32x4d",
        {**QUICKSTART, "stage_sizes": (1, 3), "scan_blocks": True, "drop_path_rate": 0.2},
        16,
    ),
    ("no_head", "resnet18", {**TINY, "num_classes": 0}, 32),
    ("regnet_small_stem_silu", "regnet_y_400mf", {"small_stem": True, "activation": "silu", "num_classes": 7}, 32),
]
NAME_CASES = [  # one name per family of the registry, at small sizes
    ("resnet18", "resnet18", {}, 64),
    ("resnext50_32x4d", "resnext50_32x4d", {}, 64),
    ("regnet_y_400mf", "regnet_y_400mf", {}, 64),
    ("seresnext26d_32x4d", "seresnext26d_32x4d", {}, 64),
    ("resnet50d", "resnet50d", {}, 64),
    ("resnet50_gn", "resnet50_gn", {}, 64),
]

SCRIPT = r"""
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is blocked in this test: ONNX export must not need torch")

sys.meta_path.insert(0, NoTorch())
import functools
import jax, jax.numpy as jnp, numpy as np
from resnext_jax import create_model
from resnext_jax.export import export, load
from resnext_jax.inference.loader import LoadedModel, Preprocessing

def random_model(name, fields, seed=0):
    module = create_model(name, **fields)
    variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):  # norm statistics and affines, SE biases; not the kernels, not the head
        keys = [entry.key for entry in path]
        if keys[1] == "fc" or keys[-1] not in ("mean", "var", "scale", "bias"):
            return leaf
        if keys[-1] in ("mean", "bias"):
            return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(perturb, dict(variables))
    classes = module.num_classes or 1
    pre = Preprocessing(40, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), tuple(map(str, range(classes))))
    return LoadedModel(name, module, variables, pre, {"kind": "test"}, None, fields)

results = {}
for case, name, fields, size, out in json.loads(sys.argv[1]):
    loaded = random_model(name, fields)
    metadata = export(loaded, out, format="onnx", resolution=size)
    served = load(out)
    apply = jax.jit(functools.partial(loaded.module.apply, train=False))
    images = np.random.default_rng(1).standard_normal((5, size, size, 3)).astype(np.float32)
    expected = np.asarray(apply(loaded.variables, images))
    got1, got5 = served(images[:1]), served(images)
    results[case] = {
        "error_b1": float(np.max(np.abs(got1 - expected[:1]))),
        "error_b5": float(np.max(np.abs(got5 - expected))),
        "scale": max(1.0, float(np.std(expected))),
        "shape": list(got5.shape),
        "expected_shape": list(expected.shape),
        "ops": sorted({node.op_type for node in __import__("onnx").load(out).graph.node}),
        "input_shape": metadata["input"]["shape"],
    }
results["imported_torch"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
print(json.dumps(results))
"""


def _run(tmp_path_factory, cases) -> dict:
    directory = tmp_path_factory.mktemp("onnx")
    jobs = [(case, name, fields, size, str(directory / f"{case}.onnx")) for case, name, fields, size in cases]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(jobs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert results.pop("imported_torch") == []
    return results


@pytest.fixture(scope="module")
def field_results(tmp_path_factory):
    return _run(tmp_path_factory, FIELD_CASES)


@pytest.fixture(scope="module")
def name_results(tmp_path_factory):
    return _run(tmp_path_factory, NAME_CASES)


def _check(result, case):
    print(f"{case}: batch 1 {result['error_b1']:.2g}, batch 5 {result['error_b5']:.2g}, scale {result['scale']:.3g}")
    assert result["input_shape"][0] is None  # one file, any batch
    assert result["shape"] == result["expected_shape"]
    assert result["error_b1"] <= 1e-4 * result["scale"]
    assert result["error_b5"] <= 1e-4 * result["scale"]


@pytest.mark.slow  # one subprocess over nine small models, about 60 s on 2 cores
@pytest.mark.parametrize("case", [case[0] for case in FIELD_CASES])
def test_every_field_combination_matches_apply_without_torch(field_results, case):
    result = field_results[case]
    _check(result, case)
    ops = set(result["ops"])
    assert "BatchNormalization" not in ops  # folded into the convs
    if "group" in case:
        assert "InstanceNormalization" in ops
    if "avg_down" in case or "tiered" in case:
        assert "AveragePool" in ops
    if case == "no_head":
        assert "Gemm" not in ops and result["shape"] == [5, 16]  # the pre-logits: stage 2 of TINY is 16 wide
    if "gelu" in case:
        assert "Tanh" in ops


@pytest.mark.slow  # six ImageNet-shaped models at 64 px, about 90 s on 2 cores
@pytest.mark.parametrize("case", [case[0] for case in NAME_CASES])
def test_one_name_per_family_matches_apply_without_torch(name_results, case):
    _check(name_results[case], case)
