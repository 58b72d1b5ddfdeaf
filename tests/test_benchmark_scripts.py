"""benchmarks/floor.py and benchmarks/ab.py: what they patch, record and import is what they say."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import torch
import torchvision

import resnext_jax
from resnext_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import floor  # noqa: E402


def _torch_dense_kernels(name):
    """HWIO shapes of torchvision's ungrouped Conv2d weights (OIHW), sorted."""
    model = torchvision.models.get_model(name, num_classes=1000)
    return sorted(
        (m.kernel_size[0], m.kernel_size[1], m.in_channels, m.out_channels)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == 1
    )


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf"])
def test_dense_convs_are_torchvisions_ungrouped_convs(name):
    """floor.py's 'dense convs alone' row times exactly the convs torchvision runs with groups=1."""
    recorded = floor.dense_convs(layers, resnext_jax.create_model(name), batch=1, resolution=64)
    assert sorted(k for _, k, _, _ in recorded) == _torch_dense_kernels(name)


def _conv_count(model, x):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables)

    def count(jx):
        n = 0
        for eqn in jx.eqns:
            n += eqn.primitive.name == "conv_general_dilated"
            for param in eqn.params.values():
                if hasattr(param, "jaxpr"):
                    n += count(param.jaxpr)
        return n

    return count(jaxpr.jaxpr)


@pytest.mark.slow  # 11 s; CI runs it
def test_free_grouped_replaces_the_grouped_convs_and_nothing_else():
    model = resnext_jax.create_model("resnext50_32x4d", conv_impl="xla")
    x = jnp.zeros((1, 64, 64, 3))
    dense = len(floor.dense_convs(layers, model, batch=1, resolution=64))
    real = _conv_count(model, x)
    with floor.free_grouped(layers):
        free = _conv_count(model, x)
        logits = model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)
    assert real == dense + 16 and free == dense  # ResNeXt-50 has 16 grouped convs, one per block
    assert logits.shape == (1, 1000)
    assert layers.conv2d is resnext_jax.ops.conv2d  # restored on exit


def test_ab_imports_each_revision_from_its_own_export(tmp_path):
    """ab.py must time the exported revision's code, not whatever `resnext_jax` was imported first."""
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.fail("ab.py needs the repository's git history (run the tests from a git clone)")
    script = (
        "import sys; sys.path.insert(0, 'benchmarks'); import ab\n"
        f"head = ab.import_package(ab.export('HEAD', {str(tmp_path)!r}))\n"
        "print(head.__file__)\n"
        "tree = ab.import_package(ab.export('.', None))\n"
        "print(tree.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    head_file, tree_file = result.stdout.split()
    assert head_file.startswith(str(tmp_path)) and os.path.exists(head_file)
    assert tree_file == os.path.join(ROOT, "resnext_jax", "models", "registry.py")
    bad = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "no-such-revision", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RESNEXT_JAX_HUGEPAGES": "0"},
    )
    assert bad.returncode != 0 and "git archive no-such-revision failed" in bad.stderr
