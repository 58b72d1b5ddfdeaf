"""Training system: it learns, resumes exactly, validates its config and guards the workdir.

The multi-device equivalence test is in test_train_multidevice.py; slow end-to-end CLI tests in
test_train_cli.py.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import cpu, parallel
from resnext_jax.parallel import check_batch_size
from resnext_jax.training import ConfigError, default_config, read_metrics, train_and_evaluate, validate_config
from resnext_jax.training.checkpoint import Checkpointer
from resnext_jax.training.optim import create_learning_rate_schedule, create_optimizer
from resnext_jax.training.workdir import check_compatible

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def tiny_config(**changes):
    """A one-stage ResNeXt (4 groups) on digits at 16x16: compiles in seconds, 22 steps per epoch."""
    config = default_config()
    config.model_kwargs.stage_sizes = (1,)
    config.model_kwargs.num_filters = 8
    config.model_kwargs.cardinality = 4
    config.model_kwargs.bottleneck_width = 32
    config.model_kwargs.small_stem = True
    config.dataset = "digits"
    config.image_size = 16
    config.transform = "none"
    config.batch_size = 64
    config.eval_batch_size = 128
    config.learning_rate = 5e-3
    config.warmup_epochs = 0.5
    config.num_epochs = 2
    config.log_every_steps = 10
    config.checkpoint_every_steps = 1000
    config.progress_bar = False
    config.write_report = False  # test_short_quickstart_learns_and_writes_workdir checks the report
    for key, value in changes.items():
        config[key] = value
    return config


def _records(workdir, split):
    return [r for r in read_metrics(workdir) if r["split"] == split]


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_short_quickstart_learns_and_writes_workdir(tmp_path):
    config = load_config("quickstart")
    config.num_epochs, config.batch_size, config.progress_bar = 2, 64, False
    summary = train_and_evaluate(config, str(tmp_path))
    # 10 classes: chance is ~10 %. Two short epochs of the quick start's ResNeXt must be far above it.
    assert summary["eval"]["top1"] > 0.8, summary
    assert summary["eval"]["count"] == 360  # the whole eval split, padding masked out
    train, evals = _records(tmp_path, "train"), _records(tmp_path, "eval")
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"step", "split", "loss", "top1", "grad_norm", "param_norm", "learning_rate"} <= set(train[0])
    assert {"step", "split", "loss", "top1", "top5"} <= set(evals[0])
    assert [r["step"] for r in evals] == [22, 44]
    for name in ("config.json", "environment.json"):
        assert (tmp_path / name).exists()
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["devices"]
    # Which native CPU kernels the traced step uses, and why the others are not (resnext_jax.cpu.report()).
    kernels = environment["native_kernels"]
    assert set(kernels["used"]) | set(kernels["not_used"]) == set(cpu.KERNELS)
    if kernels["available"]:  # the quick start's ResNeXt trains its grouped convs in the native kernels
        assert {"grouped_conv_forward", "grouped_conv_kernel_grad", "channel_sums"} <= set(kernels["used"])
    else:
        assert kernels["unavailable_reason"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    assert Checkpointer(str(tmp_path), 3).latest_step() == 44
    # Per-stage diagnostics on every logged point, and the end-of-run report of the best checkpoint.
    assert {"grad_norm/stem", "param_norm/layer2", "dead_relu/layer1"} <= set(train[-1])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["accuracy"]["top1"] == pytest.approx(max(r["top1"] for r in evals), abs=1e-6)  # logs round to 6


@pytest.mark.slow  # 20 s; CI runs it
def test_stop_and_resume_matches_uninterrupted_run(tmp_path):
    config = tiny_config(num_epochs=1.5)
    full = train_and_evaluate(config, str(tmp_path / "full"))
    first = train_and_evaluate(config, str(tmp_path / "split"), stop_at_step=15)  # mid-epoch, mid-log-window
    assert first["stopped_early"] and first["step"] == 15
    resumed = train_and_evaluate(config, str(tmp_path / "split"))
    assert resumed["step"] == full["step"] == 33
    full_records, split_records = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    # The log window that straddles the stop (steps 11-20) averages only steps 16-20 after the resume.
    drop = lambda records: [r for r in records if not (r["split"] == "train" and r["step"] == 20)]  # noqa: E731
    full_records, split_records = drop(full_records), drop(split_records)
    assert [(r["step"], r["split"]) for r in full_records] == [(r["step"], r["split"]) for r in split_records]
    for a, b in zip(full_records, split_records):
        for key in ("loss", "top1", "grad_norm", "param_norm", "top5"):
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{a} vs {b}")


def test_misspelled_config_key_names_it_and_the_closest_match():
    config = tiny_config()
    config.learnin_rate = 0.1
    with pytest.raises(ConfigError, match=r"'learnin_rate'.*Did you mean 'learning_rate'"):
        validate_config(config)


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="optimizer.*'adamw', 'sgd'"):
        validate_config(tiny_config(optimizer="adam"))
    with pytest.raises(
        ValueError,
        match=r"batch_size=100 is not divisible by 8 devices; use a multiple of 8 "
        r"\(e.g. --config.batch_size=96 or 104\)",
    ):
        check_batch_size(100, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_batch_size(24, 8, grad_accum_steps=2)


def test_workdir_with_other_config_is_refused(tmp_path):
    saved = json.loads(tiny_config().to_json())
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert check_compatible(str(tmp_path), dict(saved, num_epochs=5)) == {}  # extending a run is a resume
    with pytest.raises(ValueError, match=r"(?s)different config.*learning_rate: 0.005 -> 0.1.*new --workdir"):
        check_compatible(str(tmp_path), dict(saved, learning_rate=0.1))


def test_incomplete_checkpoint_is_never_taken(tmp_path):
    train_and_evaluate(tiny_config(num_epochs=0.5, checkpoint_every_steps=5), str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    good = Checkpointer(str(tmp_path), 3).latest_step()
    assert good == 11
    # A save cut off mid-write: the step directory exists but Orbax never committed it.
    broken = checkpoints / "99"
    (broken / "state").mkdir(parents=True)
    (broken / "state" / "garbage").write_text("half written")
    assert Checkpointer(str(tmp_path), 3).latest_step() == good


def test_schedule_warms_up_then_decays_to_the_end_value():
    config = tiny_config(learning_rate=1.0, warmup_epochs=1, num_epochs=4, end_learning_rate_ratio=0.1)
    schedule = create_learning_rate_schedule(config, steps_per_epoch=10)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(40)], [0.0, 0.5, 1.0, 0.1], atol=1e-6)
    assert schedule(20) > schedule(30)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_skips_norm_scales_and_biases(optimizer):
    config = tiny_config(optimizer=optimizer, weight_decay=0.5, grad_clip_norm=0.0, warmup_epochs=0)
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = create_optimizer(config, lambda step: 0.1)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0  # decayed
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0 and float(jnp.abs(updates["bn"]["bias"]).max()) == 0


def test_backbone_learning_rate_multiplier_scales_only_the_backbone():
    config = tiny_config(optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0, backbone_lr_mult=0.1)
    params = {"layer1": {"kernel": jnp.ones((2, 2))}, "fc": {"kernel": jnp.ones((2, 2))}}
    tx = create_optimizer(config, lambda step: 1.0, params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["fc"]["kernel"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["layer1"]["kernel"], -0.1, rtol=1e-6)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(
        optimizer="sgd",
        learning_rate=1e12,
        grad_clip_norm=0.0,
        warmup_epochs=0,
        checkpoint_every_steps=1,
        log_every_steps=1,
        num_epochs=1,
    )
    with pytest.raises(FloatingPointError, match=r"training diverged: the loss is (nan|inf) at step \d+") as error:
        train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(error.value).split(" at step ")[1].split(".")[0])
    assert "learning_rate" in str(error.value)  # the message names the fix
    latest = Checkpointer(str(tmp_path), 3).latest_step()
    assert latest is not None and latest < bad_step
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path, "train"))


def _one_step(config, norm, **step_options):
    from resnext_jax.training import step as step_lib
    from resnext_jax.training.loop import build_model

    mesh = parallel.create_mesh(jax.devices()[:1])
    config.model_kwargs.norm = norm
    model = build_model(config, 10)
    schedule = create_learning_rate_schedule(config, steps_per_epoch=10)
    variables = step_lib.init_variables(model, jax.random.PRNGKey(0), 16)
    initial = jax.device_get(variables)  # the step donates (deletes) the state's buffers
    tx = create_optimizer(config, schedule, variables["params"])
    state = step_lib.create_train_state(tx, variables, jax.random.PRNGKey(1), step_options.get("ema_decay", 0) > 0)
    state = jax.device_put(state, parallel.replicated(mesh))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=16).astype(np.int32),
    }
    train_step = step_lib.make_train_step(model, tx, schedule, mesh, num_classes=10, **step_options)
    new_state, metrics = train_step(state, parallel.global_batch(batch, mesh))
    return initial, jax.device_get(new_state), jax.device_get(metrics)


def test_gradient_accumulation_equals_the_full_batch_step():
    # Group norm: per-example statistics, so 2 micro-batches of 8 see exactly what one batch of 16 sees.
    config = tiny_config(optimizer="sgd", learning_rate=0.5, warmup_epochs=0)
    _, full, full_metrics = _one_step(config, "group")
    _, accumulated, accumulated_metrics = _one_step(
        tiny_config(optimizer="sgd", learning_rate=0.5, warmup_epochs=0), "group", grad_accum_steps=2
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), accumulated.params, full.params
    )
    np.testing.assert_allclose(accumulated_metrics["loss"], full_metrics["loss"], rtol=1e-5)


def test_ema_tracks_the_weights_and_frozen_bn_keeps_statistics_and_affine():
    config = tiny_config(optimizer="sgd", learning_rate=0.5, warmup_epochs=0)
    initial, state, _ = _one_step(config, "batch", ema_decay=0.75, freeze_bn=True)
    expected = jax.tree_util.tree_map(lambda e, p: 0.75 * e + 0.25 * p, initial["params"], state.params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema_params, expected
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.batch_stats, initial["batch_stats"])
    np.testing.assert_array_equal(state.params["bn1"]["scale"], initial["params"]["bn1"]["scale"])
    assert not np.allclose(state.params["conv1"]["kernel"], initial["params"]["conv1"]["kernel"])


def test_first_log_line_names_the_overrides_and_counts_params_like_torchvision():
    import torchvision

    from resnext_jax.training.loop import build_model, describe_model
    from resnext_jax.training.step import init_variables

    config = default_config()
    config.model = "resnet18"
    params = jax.eval_shape(lambda: init_variables(build_model(config, 1000), jax.random.key(0), 32))["params"]
    expected = sum(p.numel() for p in torchvision.models.resnet18().parameters()) / 1e6
    assert describe_model(config, params) == f"resnet18 ({expected:.2f}M params)"

    config = tiny_config()
    params = jax.eval_shape(lambda: init_variables(build_model(config, 10), jax.random.key(0), 16))["params"]
    line = describe_model(config, params)
    assert line.startswith(
        "resnext50_32x4d (bottleneck_width=32, cardinality=4, num_filters=8, small_stem=True, stage_sizes=(1,); "
    )
