"""One train step on 8 simulated CPU devices equals the same step on 1 device with the same global batch.

This is what proves the shard_map step right: BatchNorm statistics synchronized over the `data` axis and
gradients averaged with pmean. The device count must be set before JAX starts, so the check runs in a
subprocess. Tolerance: params, BN statistics and metrics within atol 2e-5 / rtol 1e-4 (float32 reduction order).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    from resnext_jax import parallel
    from resnext_jax.training import default_config, step as step_lib
    from resnext_jax.training.loop import build_model
    from resnext_jax.training.optim import create_learning_rate_schedule, create_optimizer

    assert jax.device_count() == 8, jax.devices()
    config = default_config()
    config.model_kwargs.stage_sizes = (1,)
    config.model_kwargs.num_filters = 8
    config.model_kwargs.cardinality = 4
    config.model_kwargs.bottleneck_width = 32
    config.model_kwargs.small_stem = True
    # SGD, not Adam: Adam's first step is ~lr * sign(grad), which would hide a wrong gradient scale.
    config.optimizer, config.learning_rate, config.warmup_epochs, config.weight_decay = "sgd", 0.5, 0, 1e-3
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=32).astype(np.int32)}

    def one_step(devices, sync_bn=True):
        mesh = parallel.create_mesh(devices)
        model = build_model(config, 10)
        if not sync_bn:
            model = model.clone(bn_axis_name=None)
        schedule = create_learning_rate_schedule(config, steps_per_epoch=10)
        variables = step_lib.init_variables(model, jax.random.PRNGKey(0), 16)
        tx = create_optimizer(config, schedule, variables["params"])
        state = step_lib.create_train_state(tx, variables, jax.random.PRNGKey(1), use_ema=False)
        state = jax.device_put(state, parallel.replicated(mesh))
        train_step = step_lib.make_train_step(model, tx, schedule, mesh, num_classes=10)
        state, metrics = train_step(state, parallel.global_batch(batch, mesh))
        return jax.device_get((state.params, state.batch_stats, metrics))

    def max_diff(a, b):
        diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y))
                                                                 / (1e-4 * np.abs(np.asarray(y)) + 2e-5))), a, b)
        return max(jax.tree_util.tree_leaves(diffs))

    single = one_step(jax.devices()[:1])
    multi = one_step(jax.devices())
    unsynced = one_step(jax.devices(), sync_bn=False)
    initial = step_lib.init_variables(build_model(config, 10), jax.random.PRNGKey(0), 16)
    print(json.dumps({
        # <= 1 means within atol 2e-5 + rtol 1e-4 everywhere.
        "params": max_diff(multi[0], single[0]),
        "batch_stats": max_diff(multi[1], single[1]),
        "metrics": max_diff(multi[2], single[2]),
        "unsynced_batch_stats": max_diff(unsynced[1], single[1]),
        "params_moved": max_diff(single[0], initial["params"]),
    }))
""")


@pytest.mark.slow  # 21 s: three 8-device steps in a subprocess; CI runs it
def test_eight_device_step_matches_single_device_step():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["params_moved"] > 100, scores  # the step really changed the params
    assert scores["params"] <= 1.0, scores
    assert scores["batch_stats"] <= 1.0, scores
    assert scores["metrics"] <= 1.0, scores
    # Without the axis name, each device normalizes with its own 4 examples: the test would catch that.
    assert scores["unsynced_batch_stats"] > 10, scores
