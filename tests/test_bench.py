"""The step benchmark (resnext_jax.benchmarks): its FLOP count against XLA's, its data-parallel check, its JSON,
its train step against the training system's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import resnext_jax
from resnext_jax.benchmarks import data_parallel, timing
from resnext_jax.benchmarks.jax_step import make_jax_step
from resnext_jax.benchmarks.step import model_flops
from resnext_jax.models.init import init_variables


def test_model_flops_agree_with_xla_cost_analysis():
    """2 x MACs from the jaxpr vs XLA's own count of the compiled forward. XLA skips kernel taps that fall
    on padding (7% of resnet18's at 224) and adds BN and activations, hence the band. XLA's convolutions
    (`conv_impl='xla'`): XLA cannot see into the native kernels' custom calls that 'auto' uses on CPU."""
    model = resnext_jax.create_model("resnet18", num_classes=10, conv_impl="xla")
    step, state, inputs = make_jax_step(model, "infer", batch=1, resolution=224, num_classes=10)
    compiled, _, memory = timing.compile_step(step, state, inputs)
    ratio = compiled.cost_analysis()["flops"] / model_flops(model, "infer", batch=1, resolution=224)
    assert 0.88 < ratio < 1.05, ratio
    assert model_flops(model, "train", batch=1, resolution=224) == 3 * model_flops(
        model, "infer", batch=1, resolution=224
    )
    assert memory["argument_size_in_bytes"] > 0


@pytest.mark.slow  # 17 s: two bench subprocesses; CI runs it
def test_cli_writes_json_with_torch_ratio_and_per_device_flops(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        "-m",
        "resnext_jax.benchmarks.step",
        "--model",
        "resnet18",
        "--mode",
        "infer",
        "--batch",
        "4",
        "--resolution",
        "32",
        "--runs",
        "2",
        "--devices",
        "2",
        "--flops-resolution",
        "32",
        "--json",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert "jax/torch" in result.stdout
    assert r["command"].startswith("python -m resnext_jax.benchmarks.step --model resnet18")
    assert r["jax_img_s"] > 0 and r["torch_img_s"] > 0 and r["compile_s"] > 0
    assert r["ratio_jax_over_torch"] == pytest.approx(r["jax_img_s"] / r["torch_img_s"])
    assert r["jax_minor_faults_per_step"] >= 0 and r["jax_kernel_s_per_step"] >= 0 and "page faults" in result.stdout
    dp = r["data_parallel_flops"]
    assert dp["devices"] == 2
    # shard_map: each device computes exactly its half of the batch.
    assert dp["shard_map_ratio"] == pytest.approx(1.0, abs=0.02), dp


@pytest.mark.slow
def test_train_step_gradient_flops_split_over_devices():
    """Train mode: the gradient part of the shard_map step is split over devices (the optimizer update is not)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    command = [
        sys.executable,
        "-m",
        "resnext_jax.benchmarks.step",
        "--model",
        "resnet18",
        "--mode",
        "train",
        "--batch",
        "4",
        "--devices",
        "2",
        "--flops-resolution",
        "32",
        "--_flops-check",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    dp = json.loads(result.stdout.strip().splitlines()[-1])
    assert dp["mode"] == "train" and dp["devices"] == 2
    # Every device recomputing the batch would read 2.0; what is above 1.0 is the gradient pmean's adds over
    # resnet18's 11.7M params, against a tiny 4 x 32px batch (1.09 measured).
    assert dp["shard_map_gradient_ratio"] == pytest.approx(1.0, abs=0.15), dp
    # The full step adds the replicated AdamW update (~10 FLOPs per parameter on each device).
    assert dp["shard_map_ratio"] > dp["shard_map_gradient_ratio"], dp


def test_benchmark_train_step_is_the_training_systems_step():
    """One step of the benchmark's train step and of `make_train_step` (one device, the same optimizer, no label
    smoothing) from the same weights must make the same update and statistics: the benchmark times the training
    system's forward, loss and gradients, not a copy of them."""
    import jax
    import numpy as np
    import optax

    from resnext_jax.benchmarks.jax_step import train_step
    from resnext_jax.parallel import create_mesh
    from resnext_jax.training.step import AXIS, create_train_state, make_train_step

    fields = dict(num_classes=10, stage_sizes=(1,), num_filters=8, cardinality=4, bottleneck_width=32, small_stem=True)
    model = resnext_jax.create_model("resnext50_32x4d", **fields)
    variables = init_variables(model, jax.random.key(0), 16)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 4).astype(np.int32)
    tx = optax.sgd(1.0)  # the update is the gradient itself, so gradients are compared, not just their signs
    copy = lambda tree: jax.tree.map(np.array, tree)  # noqa: E731  (both steps donate their state)

    state = (copy(variables["params"]), copy(variables["batch_stats"]), tx.init(copy(variables["params"])))
    (params, stats, _), loss = jax.jit(train_step(model, tx, 10))(state, images, labels)

    mesh = create_mesh(jax.devices()[:1])
    trainer = make_train_step(
        resnext_jax.create_model("resnext50_32x4d", bn_axis_name=AXIS, **fields),
        tx,
        optax.constant_schedule(1e-3),
        mesh,
        num_classes=10,
        stage_diagnostics=False,
    )
    trained, metrics = trainer(
        create_train_state(tx, copy(variables), jax.random.key(1), False), {"image": images, "label": labels}
    )
    np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-6)
    for got, want, before in zip(
        jax.tree.leaves(params), jax.tree.leaves(trained.params), jax.tree.leaves(variables["params"])
    ):
        np.testing.assert_allclose(got - before, want - before, rtol=1e-4, atol=1e-7)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(trained.batch_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_batch_not_divisible_by_devices_names_the_fix():
    with pytest.raises(ValueError, match="use a multiple of 4"):
        data_parallel.check_batch_divides(6, 4)
    data_parallel.check_batch_divides(8, 4)


@pytest.mark.alone  # compares a profiled call's time with a timed one
def test_profile_attributes_time_to_the_expensive_op(tmp_path):
    """A 1024^2 matmul next to a cheap add: the trace must put most of the op time on the matmul's op_name,
    and the summed op time cannot exceed the call's wall time."""
    import time

    import jax
    import jax.numpy as jnp

    def fn(a, b):
        return (a @ b) + 1.0

    a = jnp.ones((1024, 1024))
    compiled = jax.jit(fn).lower(a, a).compile()
    call = lambda: jax.block_until_ready(compiled(a, a))  # noqa: E731
    call()
    start = time.perf_counter()
    call()
    wall_ms = 1e3 * (time.perf_counter() - start)
    prof = timing.profile_step(call, compiled, str(tmp_path / "trace"))
    assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["total_ms"])
    matmul_ms = sum(ms for op, ms in prof["by_op_ms"].items() if "dot_general" in op)
    assert matmul_ms > 0.5 * prof["total_ms"], prof
    assert prof["total_ms"] < 3 * wall_ms + 5, (prof, wall_ms)


def test_inference_options_take_matmuls_out_of_ynn_with_the_same_logits():
    """On CPU the inference options move the 1x1 convs' matmuls from YNN library fusions to XLA's runtime
    matmuls (faster there, docs/benchmarks.md); the logits must not change beyond float32 rounding."""
    import jax
    import numpy as np

    from resnext_jax.ops import inference_compiler_options, step_compiler_options

    if jax.default_backend() != "cpu":
        assert inference_compiler_options() == step_compiler_options()
        return
    model = resnext_jax.create_model("resnet50", num_classes=10)
    variables = init_variables(model, jax.random.key(0), 64)
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    outputs, texts = [], []
    for options in (step_compiler_options(), inference_compiler_options()):
        compiled = (
            jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options)
            .lower(variables, images)
            .compile()
        )
        outputs.append(np.asarray(compiled(variables, images)))
        texts.append(compiled.as_text())
    assert "__ynn_fusion" in texts[0] and "__ynn_fusion" not in texts[1]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4 * np.abs(outputs[0]).max())


def test_profile_counts_ops_with_tuple_results(tmp_path):
    """An op with two results (here a two-operand sort; the native batch-norm sums are another) has a tuple
    type in the HLO text; its time must be counted, not dropped."""
    import jax
    from jax import lax

    def fn(a, b):
        keys, values = lax.sort((a, b), num_keys=1)
        return keys + values

    a = jax.random.normal(jax.random.key(0), (1 << 20,))
    compiled = jax.jit(fn).lower(a, a).compile()
    assert any(" = (" in line and " sort(" in line for line in compiled.as_text().splitlines())
    call = lambda: jax.block_until_ready(compiled(a, a))  # noqa: E731
    call()
    prof = timing.profile_step(call, compiled, str(tmp_path / "trace"))
    sort_ms = sum(ms for op, ms in prof["by_op_ms"].items() if op.startswith("sort"))
    assert sort_ms > 0.5 * prof["total_ms"], prof
