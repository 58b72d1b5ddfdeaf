"""Per-stage gradient and parameter norms in the train step, and the dead-ReLU fraction per stage.

References: the global norms the step already reports (root of the sum of the stages' squares), a float64 numpy
norm of each stage's parameters, and models whose units are made dead on purpose (zero kernels give BatchNorm a
zero batch, whose normalized output is its bias, 0, so the ReLU after it outputs 0 everywhere).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnext_jax
from resnext_jax.parallel import create_mesh
from resnext_jax.training.step import (
    AXIS,
    create_train_state,
    init_variables,
    make_dead_relu_step,
    make_train_step,
    stage_name,
)

TINY = {
    "stage_sizes": (1, 1),
    "num_filters": 8,
    "cardinality": 4,
    "bottleneck_width": 32,
    "small_stem": True,
    "num_classes": 10,
}


def tiny_model():
    return resnext_jax.create_model("resnext50_32x4d", bn_axis_name=AXIS, **TINY)


def random_batch(size=8, resolution=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(size, resolution, resolution, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size).astype(np.int32),
    }


def test_stage_names_follow_the_models_stages():
    assert [stage_name(n) for n in ("conv1", "bn1", "stem_conv", "layer1_0", "layer3_rest", "block4_12", "fc")] == [
        "stem",
        "stem",
        "stem",
        "layer1",
        "layer3",
        "block4",
        "head",
    ]


def test_stage_norms_add_up_to_the_global_norms():
    model, mesh = tiny_model(), create_mesh()
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    variables = init_variables(model, jax.random.key(0), 16)
    state = create_train_state(tx, variables, jax.random.key(1), use_ema=False)
    params = jax.tree.map(np.asarray, state.params)  # the step donates the state
    step = make_train_step(model, tx, schedule, mesh, num_classes=10)
    _, metrics = step(state, random_batch())
    metrics = jax.device_get(metrics)
    stages = ("stem", "layer1", "layer2", "head")
    for kind in ("grad_norm", "param_norm"):
        assert {key for key in metrics if key.startswith(kind + "/")} == {f"{kind}/{s}" for s in stages}
        total = np.sqrt(sum(float(metrics[f"{kind}/{s}"]) ** 2 for s in stages))
        np.testing.assert_allclose(total, metrics[kind], rtol=1e-5)
        assert all(metrics[f"{kind}/{s}"] > 0 for s in stages)
    # stage_norms itself against a float64 numpy norm of each stage's parameters.
    from resnext_jax.training.step import stage_norms

    ours = jax.device_get(stage_norms(params))
    for stage in stages:
        leaves = [leaf for name, sub in params.items() if stage_name(name) == stage for leaf in jax.tree.leaves(sub)]
        expected = np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in leaves))
        np.testing.assert_allclose(ours[stage], expected, rtol=1e-6)


def test_stage_diagnostics_can_be_turned_off():
    model, mesh = tiny_model(), create_mesh()
    tx = optax.sgd(0.1)
    state = create_train_state(tx, init_variables(model, jax.random.key(0), 16), jax.random.key(1), use_ema=False)
    step = make_train_step(model, tx, optax.constant_schedule(0.1), mesh, num_classes=10, stage_diagnostics=False)
    _, metrics = step(state, random_batch())
    assert not [key for key in metrics if "/" in key]


def _zeroed(variables, module_path, channels=None):
    """Copies `variables` with the conv kernels under `module_path` zeroed (all, or only output `channels`)."""

    def zero(path, leaf):
        names = tuple(getattr(p, "key", "") for p in path)
        if names[1 : 1 + len(module_path)] == module_path and names[-1] == "kernel":
            leaf = np.array(leaf)
            leaf[..., slice(None) if channels is None else channels] = 0
        return leaf

    return jax.tree_util.tree_map_with_path(zero, variables)


@pytest.mark.parametrize("conv_impl", ["auto", "xla"])
def test_a_dead_stage_reports_a_dead_fraction_of_one(conv_impl):
    model, mesh = tiny_model().clone(conv_impl=conv_impl), create_mesh()
    variables = init_variables(model, jax.random.key(0), 16)
    dead_relu = make_dead_relu_step(model, mesh)
    batch = jax.tree.map(jnp.asarray, random_batch())

    alive = jax.device_get(dead_relu(variables, batch))
    assert set(alive) == {"dead_relu/stem", "dead_relu/layer1", "dead_relu/layer2"}
    assert all(value == 0.0 for value in alive.values()), alive

    dead = jax.device_get(dead_relu(_zeroed(variables, ("layer2_0",)), batch))
    assert dead["dead_relu/layer2"] == 1.0
    assert dead["dead_relu/layer1"] == 0.0 and dead["dead_relu/stem"] == 0.0

    # Exactly 4 of layer1's ReLU units dead: 4 of conv1's 16 output channels. Layer1 has 16 (bn1) + 16 (bn2)
    # + 32 (block output) = 64 units.
    partly = jax.device_get(dead_relu(_zeroed(variables, ("layer1_0", "conv1"), channels=[0, 5, 9, 15]), batch))
    assert partly["dead_relu/layer1"] == pytest.approx(4 / 64)


DEVICES_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    import resnext_jax
    from resnext_jax import parallel
    from resnext_jax.training.step import AXIS, init_variables, make_dead_relu_step

    assert jax.device_count() == 2, jax.devices()
    model = resnext_jax.create_model("resnext50_32x4d", bn_axis_name=AXIS, **json.loads(%r))
    variables = init_variables(model, jax.random.key(0), 16)
    images = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
    images[:4] = 0  # the first device's half: the stem conv outputs 0 there, so units die on that half only
    batch = {"image": images, "label": np.zeros(8, np.int32)}
    result = {}
    for name, devices, part in (("two", jax.devices(), slice(None)), ("one", jax.devices()[:1], slice(None)),
                                ("zero_half", jax.devices()[:1], slice(0, 4))):
        mesh = parallel.create_mesh(devices)
        local = {key: value[part] for key, value in batch.items()}
        out = make_dead_relu_step(model, mesh)(variables, parallel.global_batch(local, mesh))
        result[name] = {key: float(value) for key, value in jax.device_get(out).items()}
    print(json.dumps(result))
""")


@pytest.mark.slow  # a subprocess with two simulated devices: 25 s
def test_dead_units_are_counted_over_the_global_batch_on_several_devices():
    """A unit zero on one device's images but not on the other's is alive: two devices give the one-device
    result on the same global batch (the per-device answer would differ, as the zero half alone shows)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", DEVICES_SCRIPT % json.dumps(TINY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    fractions = json.loads(result.stdout.strip().splitlines()[-1])
    assert fractions["two"] == fractions["one"]
    assert fractions["zero_half"]["dead_relu/stem"] > fractions["one"]["dead_relu/stem"]
