"""Every shipped config loads, validates and builds its model; the CIFAR ResNeXt-29 has the paper's size."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

import resnext_jax
from resnext_jax.training import validate_config
from resnext_jax.training.loop import build_model

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not p.endswith("__init__.py"))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_the_issue_s_configs_exist():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    assert {
        "quickstart",
        "resnext50",
        "resnet50",
        "imagenette_resnext50",
        "cifar10_resnext29",
        "finetune_cifar10",
    } <= names
    assert any(n.startswith("regnet") for n in names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_config_validates_and_builds(path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(CONFIG_DIR, ".."))  # variant configs import `configs.<base>`
    config = load(path)
    validate_config(config)
    model = build_model(config, 10)
    assert config.model in resnext_jax.list_models()
    assert model.num_classes == 10


def test_cifar_resnext29_8x64d_matches_the_paper():
    config = load(os.path.join(CONFIG_DIR, "cifar10_resnext29.py"))
    model = build_model(config, 10)
    specs = model.stage_specs()
    assert [s["bottleneck_width"] for s in specs] == [512, 1024, 2048]
    assert [s["out_channels"] for s in specs] == [256, 512, 1024]
    assert [s["blocks"] for s in specs] == [3, 3, 3] and {s["groups"] for s in specs} == {8}
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert abs(num_params - 34.4e6) < 0.05e6, num_params  # Xie et al. 2017, Table 7
