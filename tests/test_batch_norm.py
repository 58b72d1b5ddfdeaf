"""`models.norms.BatchNorm` (hand-written backward, fused add + ReLU) against flax.linen.BatchNorm + autodiff.

flax's BatchNorm is the second implementation: same variables, same update rule, so outputs, running
statistics and gradients with respect to the input, the residual, scale and bias must all agree.
"""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import cpu
from resnext_jax.models.norms import BatchNorm


class FlaxReference(nn.Module):
    """flax's BatchNorm, then the add and the activation, differentiated by autodiff."""

    train: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, residual=None, act=None):
        y = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn")(x)
        if residual is not None:
            y = y + residual
        return act(y) if act is not None else y


class Ours(nn.Module):
    train: bool
    dtype: object = jnp.float32
    native_epilogue: bool = False

    @nn.compact
    def __call__(self, x, residual=None, act=None):
        return BatchNorm(
            use_running_average=not self.train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            native_epilogue=self.native_epilogue,
            name="bn",
        )(x, residual=residual, act=act)


def _inputs(dtype=jnp.float32, shape=(4, 5, 6, 16)):
    rng = np.random.default_rng(0)
    # A large per-channel offset tests the E[x^2] - E[x]^2 variance and the centred backward.
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, shape[-1]) + rng.uniform(-4, 4, shape[-1])
    variables = {
        "params": {"bn": {"scale": rng.uniform(0.5, 1.5, shape[-1]), "bias": rng.standard_normal(shape[-1])}},
        "batch_stats": {"bn": {"mean": rng.standard_normal(shape[-1]), "var": rng.uniform(0.5, 2, shape[-1])}},
    }
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
    return (
        jnp.asarray(x, dtype),
        jnp.asarray(rng.standard_normal(shape), dtype),
        jnp.asarray(rng.standard_normal(shape), jnp.float32),
        variables,
    )


def _run(module, variables, x, residual, weights, act):
    """Output, updated running statistics and gradients of sum(y * weights) w.r.t. (params, x, residual)."""

    def loss(params, x, residual):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, residual, act, mutable=["batch_stats"]
        )
        return jnp.sum(y.astype(jnp.float32) * weights), (y, updates["batch_stats"])

    grads, (y, stats) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(variables["params"], x, residual)
    return y, stats, grads


@pytest.mark.parametrize("act", [None, nn.relu, nn.silu], ids=["none", "relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("native_epilogue", [False, True], ids=["xla", "native"])
def test_train_mode_matches_flax(act, with_residual, native_epilogue):
    """`native_epilogue` (on CPU with the native kernels): the forward's add and ReLU in the native pass."""
    if native_epilogue and not cpu.available():
        pytest.skip("native kernels unavailable: test_grouped_conv.py::test_native_builds_wherever_it_can says why")
    x, residual, weights, variables = _inputs()
    residual = residual if with_residual else None
    y, stats, grads = _run(Ours(train=True, native_epilogue=native_epilogue), variables, x, residual, weights, act)
    y_ref, stats_ref, grads_ref = _run(FlaxReference(train=True), variables, x, residual, weights, act)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("act", [None, nn.relu])
def test_eval_mode_matches_flax(act):
    x, residual, weights, variables = _inputs()
    y = Ours(train=False).apply(variables, x, residual, act)
    y_ref = FlaxReference(train=False).apply(variables, x, residual, act)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_float32_reference():
    """bf16 activations: statistics in float32, output and input gradient in bf16 (rounding-level error)."""
    x, residual, weights, variables = _inputs(jnp.bfloat16)
    y, stats, grads = _run(Ours(train=True, dtype=jnp.bfloat16), variables, x, residual, weights, nn.relu)
    assert y.dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16 and grads[0]["bn"]["scale"].dtype == jnp.float32
    y_ref, stats_ref, grads_ref = _run(
        FlaxReference(train=True), variables, x.astype(jnp.float32), residual.astype(jnp.float32), weights, nn.relu
    )
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref, rtol=2e-2, atol=2e-2)
    for ours, ref in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(ours.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2 * float(jnp.abs(ref).max()))


def test_synced_statistics_match_flax_under_shard_map():
    """With `axis_name`, statistics and the input gradient span every device's slice, as flax's do.

    Runs on 4 simulated CPU devices, in a subprocess (the device count is fixed when JAX starts).
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    code = "import test_batch_norm as t; t.check_synced_statistics(4)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(__file__),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def check_synced_statistics(num_devices: int):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    assert len(devices) == num_devices, devices
    mesh = Mesh(np.array(devices), ("d",))
    x, residual, weights, variables = _inputs(shape=(2 * len(devices), 3, 3, 8))

    def per_device(module):
        def fn(params, x, residual, weights):
            def loss(params, x):
                y, updates = module.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    x,
                    residual,
                    nn.relu,
                    mutable=["batch_stats"],
                )
                return jnp.sum(y * weights), updates["batch_stats"]

            (_, stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            return stats, jax.lax.pmean(grads[0], "d"), grads[1]

        return jax.jit(
            jax.shard_map(
                fn, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d")), out_specs=(P(), P(), P("d")), check_vma=False
            )
        )

    class SyncedOurs(nn.Module):
        @nn.compact
        def __call__(self, x, residual, act):
            return BatchNorm(axis_name="d", name="bn")(x, residual=residual, act=act)

    class SyncedFlax(nn.Module):
        @nn.compact
        def __call__(self, x, residual, act):
            return act(
                nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name="d", name="bn")(x)
                + residual
            )

    ours = per_device(SyncedOurs())(variables["params"], x, residual, weights)
    ref = per_device(SyncedFlax())(variables["params"], x, residual, weights)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


# ------------------------------------------------------------------ native inference epilogue (CPU)
needs_native = pytest.mark.skipif(
    not cpu.available(),
    reason="native kernels unavailable: tests/test_grouped_conv.py::test_native_builds_wherever_it_can says why",
)


@needs_native
@pytest.mark.parametrize(
    "shape", [(2, 5, 7, 256), (3, 4, 4, 40), (2, 3, 3, 37), (5, 24)], ids=["c256", "c40-tail16", "c37-tail8", "rank2"]
)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual_affine", [True, False])
def test_native_affine_add_relu_matches_float64(shape, relu, residual_affine):
    rng = np.random.default_rng(1)
    y, r = rng.standard_normal(shape) + 3, rng.standard_normal(shape) - 2
    m, s, b, rm, rs, rb = (rng.standard_normal(shape[-1]) for _ in range(6))
    f32 = lambda *a: [jnp.asarray(v, jnp.float32) for v in a]
    out = jax.jit(cpu.affine_add_relu, static_argnames="relu")(
        *f32(y, m, s, b, r), tuple(f32(rm, rs, rb)) if residual_affine else None, relu=relu
    )
    ref = (y - m) * s + b + ((r - rm) * rs + rb if residual_affine else r)
    np.testing.assert_allclose(out, np.maximum(ref, 0) if relu else ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize(
    "shape",
    [(2, 5, 7, 256), (9, 40, 40, 24), (3, 4, 4, 37), (5, 24), (2, 15, 40000)],
    ids=["c256", "c24-many-items", "c37-tail5", "rank2", "c40000-three-waves"],
)
@pytest.mark.parametrize("masked", [True, False])
def test_native_channel_sums_match_float64(shape, masked):
    """Batch norm's per-channel sums (training statistics and backward) against float64 numpy, with a mask
    that, like a ReLU's output, has exact zeros (masked out) and a per-channel offset to centre."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape) * 2 + rng.uniform(-5, 5, shape[-1])
    shift = rng.uniform(-5, 5, shape[-1])
    mask = np.maximum(rng.standard_normal(shape), 0.0) if masked else None
    f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)  # noqa: E731
    sums = jax.jit(cpu.channel_sums)(f32(a), f32(b), f32(shift), f32(mask))
    a, b, shift = (np.asarray(f32(v), np.float64) for v in (a, b, shift))
    a = np.where(mask > 0, a, 0.0) if masked else a
    axes = tuple(range(a.ndim - 1))
    for got, want in zip(sums, (a.sum(axes), (a * (b - shift)).sum(axes))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_native
def test_native_channel_sums_of_long_columns_stay_accurate():
    """8 channels, 8192 rows, mean 20: sum x^2 within 3e-7 of float64 (XLA's own reduction: 7e-8). One float32
    running sum down each column (4096 rows per item, as a first version had) was 2.3e-6 off, which
    E[x^2] - E[x]^2 turned into variances 25x worse than XLA's and an 8-device train step out of tolerance."""
    x = (np.random.default_rng(3).standard_normal((32, 16, 16, 8)) + 20).astype(np.float32)
    sums, squares = jax.jit(lambda x: cpu.channel_sums(x, x, jnp.zeros(8)))(x)
    x = x.astype(np.float64)
    np.testing.assert_allclose(sums, x.sum((0, 1, 2)), rtol=3e-7)
    np.testing.assert_allclose(squares, (x * x).sum((0, 1, 2)), rtol=3e-7)


class Block(nn.Module):
    """A block's end as the models have it: the shortcut's batch norm deferred, the last one adding it."""

    native_epilogue: bool

    @nn.compact
    def __call__(self, x, shortcut, act):
        bn = functools.partial(BatchNorm, use_running_average=True, native_epilogue=self.native_epilogue)
        return bn(name="bn")(x, residual=bn(name="shortcut_bn")(shortcut, defer=True), act=act)


@needs_native
@pytest.mark.parametrize("act", [None, nn.relu, nn.silu], ids=["none", "relu", "silu"])
def test_eval_mode_native_epilogue_matches_flax(act):
    """The native epilogue (and the deferred shortcut norm) against flax's two batch norms, add, activation;
    SiLU is not fused and must still give the same result."""
    x, shortcut, _, variables = _inputs(shape=(4, 5, 6, 40))
    rng = np.random.default_rng(2)
    variables = {
        kind: {"bn": tree["bn"], "shortcut_bn": jax.tree.map(lambda v: v * rng.uniform(0.5, 1.5), tree["bn"])}
        for kind, tree in variables.items()
    }

    def reference(x, shortcut):
        flax_bn = functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=1e-5)
        apply = lambda name, v: flax_bn().apply({k: tree[name] for k, tree in variables.items()}, v)
        y = apply("bn", x) + apply("shortcut_bn", shortcut)
        return act(y) if act is not None else y

    expected = reference(x, shortcut)
    step = jax.jit(lambda v, x, s: Block(native_epilogue=True).apply(v, x, s, act))
    np.testing.assert_allclose(step(variables, x, shortcut), expected, rtol=1e-5, atol=1e-5)
    fused = cpu.EPILOGUE_TARGET in step.lower(variables, x, shortcut).as_text()
    assert fused == (act is not nn.silu)
    plain = jax.jit(lambda v, x, s: Block(native_epilogue=False).apply(v, x, s, act))
    assert cpu.EPILOGUE_TARGET not in plain.lower(variables, x, shortcut).as_text()
    np.testing.assert_allclose(plain(variables, x, shortcut), expected, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.slow  # 13 s on the 2-core AMD; CI runs it
def test_gradients_through_an_inference_model_with_the_native_epilogue():
    """Saliency-style gradients of an inference-mode ResNet (native matmul or epilogue on CPU) equal those of the
    pure-XLA model (`conv_impl='xla'`), with respect to the input and to the parameters."""
    import resnext_jax

    kwargs = dict(stage_sizes=(1, 1, 1, 1), num_filters=16, num_classes=5)
    fast, plain = (resnext_jax.create_model("resnet50", conv_impl=impl, **kwargs) for impl in ("auto", "xla"))
    variables = jax.jit(lambda: plain.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))()
    variables = jax.tree.map(
        lambda v: v + 0.1 * jax.random.normal(jax.random.key(1), v.shape) if v.ndim == 1 else v, variables
    )
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))

    def grads(model):
        def loss(params, x):
            return jnp.sum(model.apply({**variables, "params": params}, x, train=False)[:, 1])

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return step, step(variables["params"], images)

    step, ours = grads(fast)
    # Every block's end is one native call: the 1x1 conv's matmul with the epilogue on AVX2 builds, else the
    # separate epilogue pass; their VJPs are the JAX formulas' autodiff.
    target = cpu.MATMUL_TARGET if cpu.matmul_preferred() else cpu.EPILOGUE_TARGET
    assert target in step.lower(variables["params"], images).as_text()
    _, expected = grads(plain)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


# ------------------------------------------------------------------ native 1x1 conv + inference norm (CPU)
# (M, K, N): every row tail of the 6-row register blocks (M % 6 = 1, 2, 3, 4, 5, 0), K below, at and across
# the 256-deep passes (300, 513), 1 to 4 column blocks of 16, a last block of 8 (8, 24, 40 columns), and work
# items of 2 and 8 row blocks (from 128 and 512 blocks on) whose last ends in a partial block (791 rows:
# 65 items of 12 rows, then 6 + 5; 3077: 64 items of 48, then 5).
MATMUL_CASES = [
    (1, 3, 16),
    (8, 64, 24),
    (15, 300, 48),
    (28, 256, 8),
    (35, 513, 64),
    (54, 40, 40),
    (791, 72, 24),
    (3077, 16, 16),
]


@needs_native
@pytest.mark.parametrize("shape", MATMUL_CASES, ids=["x".join(map(str, c)) for c in MATMUL_CASES])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("prologue", [None, "affine", "affine-relu"])
def test_native_matmul_affine_matches_float64(shape, relu, with_residual, prologue):
    m, k, n = shape
    rng = np.random.default_rng(4)
    a, b, r = rng.standard_normal((m, k)), rng.standard_normal((k, n)) / np.sqrt(k), rng.standard_normal((m, n))
    scale, shift = rng.uniform(-2, 2, n), rng.standard_normal(n)
    a_scale, a_shift = rng.uniform(-2, 2, k), rng.standard_normal(k)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    a, b, r, scale, shift, a_scale, a_shift = (
        np.asarray(f32(v), np.float64) for v in (a, b, r, scale, shift, a_scale, a_shift)
    )
    assert cpu.supports_matmul(a.shape, b.shape, jnp.float32)
    out = jax.jit(cpu.matmul_affine, static_argnames=("relu", "prologue_relu"))(
        f32(a),
        f32(b),
        f32(scale),
        f32(shift),
        f32(r) if with_residual else None,
        relu=relu,
        prologue=(f32(a_scale), f32(a_shift)) if prologue else None,
        prologue_relu=prologue == "affine-relu",
    )
    if prologue:
        a = a * a_scale + a_shift
        a = np.maximum(a, 0) if prologue == "affine-relu" else a
    ref = a @ b * scale + shift + (r if with_residual else 0.0)
    np.testing.assert_allclose(out, np.maximum(ref, 0) if relu else ref, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_matmul_affine_gradients_match_float64():
    """Its VJP (the autodiff of the same formula in JAX) against float64 numpy's, for every input."""
    rng = np.random.default_rng(5)
    m, k, n = 13, 20, 32
    a, b, r, g = (rng.standard_normal(s) for s in ((m, k), (k, n), (m, n), (m, n)))
    scale, shift, a_scale, a_shift = (
        rng.uniform(-2, 2, n),
        rng.standard_normal(n),
        rng.uniform(-2, 2, k),
        rng.standard_normal(k),
    )
    args = [jnp.asarray(v, jnp.float32) for v in (a, b, scale, shift, r, a_scale, a_shift)]
    a, b, scale, shift, r, a_scale, a_shift = (np.asarray(v, np.float64) for v in args)
    _, vjp = jax.vjp(
        lambda a, b, s, h, r, p, q: cpu.matmul_affine(a, b, s, h, r, relu=True, prologue=(p, q), prologue_relu=True),
        *args,
    )
    got = vjp(jnp.asarray(g, jnp.float32))
    u = a * a_scale + a_shift
    a1 = np.maximum(u, 0)
    z = a1 @ b * scale + shift + r
    gz = g * (z > 0)
    ga1 = gz * scale @ b.T
    gu = ga1 * (u > 0)
    want = (gu * a_scale, a1.T @ (gz * scale), (gz * (a1 @ b)).sum(0), gz.sum(0), gz, (gu * a).sum(0), gu.sum(0))
    for name, x, y in zip(("a", "b", "scale", "shift", "residual", "a_scale", "a_shift"), got, want):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=name)


def test_native_matmul_only_where_it_applies():
    assert cpu.matmul_preferred() == (cpu.isa() == "avx2")
    assert not cpu.supports_matmul((8, 64), (64, 20), jnp.float32)  # 20 columns
    assert not cpu.supports_matmul((8, 64), (64, 32), jnp.bfloat16)
    assert not cpu.supports_matmul((8, 64), (32, 32), jnp.float32)  # K mismatch


@needs_native
@pytest.mark.parametrize(
    "model,kwargs",
    [
        ("resnext50_32x4d", dict(stage_sizes=(1, 1, 1, 1), num_filters=32)),
        # 6-18 s each on the 2-core AMD; CI runs them
        pytest.param("resnet50", dict(stage_sizes=(1, 2, 1, 1), num_filters=16), marks=pytest.mark.slow),
        pytest.param("regnet_y_400mf", dict(), marks=pytest.mark.slow),
        pytest.param("resnet50", dict(stage_sizes=(1, 1, 1, 1), num_filters=16, norm="group"), marks=pytest.mark.slow),
        pytest.param(
            "resnet50", dict(stage_sizes=(1, 1, 1, 1), num_filters=16, activation="silu"), marks=pytest.mark.slow
        ),
    ],
    ids=["resnext", "resnet", "regnet-se", "group-norm", "silu"],
)
def test_inference_models_fuse_1x1_convs_with_their_norms(model, kwargs, monkeypatch):
    """At inference with the native kernels, every 1x1 conv with batch norm and ReLU (or none) and its
    shortcut runs as `cpu.matmul_affine`; the logits equal the pure-XLA model's (`conv_impl='xla'`:
    XLA's convs, flax's batch-norm formula). Group norm and SiLU blocks compute the conv as before. The
    models use the kernel on AVX2 builds only (`cpu.MATMUL_ISAS`); here it is forced for any build."""
    import resnext_jax

    monkeypatch.setattr(cpu.kernels, "MATMUL_ISAS", (cpu.isa(),))

    fast, plain = (resnext_jax.create_model(model, conv_impl=impl, num_classes=7, **kwargs) for impl in ("auto", "xla"))
    images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    variables = jax.jit(lambda: plain.init(jax.random.key(0), images, train=False))()
    rng = np.random.default_rng(6)
    # Non-trivial running statistics, affine parameters and head, so that every term of the epilogue counts.
    variables = jax.tree.map(
        lambda v: (
            v * rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
            + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
        ),
        variables,
    )
    step = jax.jit(lambda v, x: fast.apply(v, x, train=False))
    fused = step.lower(variables, images).as_text().count(cpu.MATMUL_TARGET)
    paths = [
        jax.tree_util.keystr(path)
        for path, v in jax.tree_util.tree_leaves_with_path(variables["params"])
        if v.ndim == 4
        and v.shape[:2] == (1, 1)
        and v.shape[-1] % cpu.MATMUL_COLUMNS == 0
        and "'se'" not in jax.tree_util.keystr(path)
    ]  # SE's convs have biases and no norm
    shortcuts = [p for p in paths if "downsample" in p or "proj" in p]
    if kwargs.get("norm") == "group":
        assert fused == 0
    else:  # with SiLU, only the shortcuts' convs (batch norm, no activation)
        assert fused == len(shortcuts if kwargs.get("activation") == "silu" else paths) > 0, (fused, paths)
    expected = jax.jit(lambda v, x: plain.apply(v, x, train=False))(variables, images)
    got = step(variables, images)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


@needs_native
def test_conv_defers_only_1x1_convs_the_matmul_takes(monkeypatch):
    """`Conv2d(defer=True)` returns a `DeferredConv` only for a dense 1x1 conv without bias, 'auto' or 'native',
    float32, on a build in `cpu.MATMUL_ISAS`; anything else is the conv itself, as without `defer`."""
    from resnext_jax.models.layers import Conv2d
    from resnext_jax.ops.fusion import DeferredConv

    x = jnp.ones((2, 4, 4, 16))
    cases = [
        (dict(features=32, kernel_size=(1, 1)), x, True),
        (dict(features=32, kernel_size=(1, 1), strides=(2, 2)), x, True),
        (dict(features=32, kernel_size=(1, 1), impl="xla"), x, False),
        (dict(features=32, kernel_size=(1, 1), use_bias=True), x, False),
        (dict(features=32, kernel_size=(3, 3)), x, False),
        (dict(features=32, kernel_size=(1, 1), groups=2), x, False),
        (dict(features=20, kernel_size=(1, 1)), x, False),
        (dict(features=32, kernel_size=(1, 1)), x.astype(jnp.bfloat16), False),
    ]
    for isas in ((cpu.isa(),), ()):
        monkeypatch.setattr(cpu.kernels, "MATMUL_ISAS", isas)
        for fields, inputs, deferred in cases:
            conv = Conv2d(**fields)
            variables = conv.init(jax.random.key(0), inputs)
            out = conv.apply(variables, inputs, defer=True)
            assert isinstance(out, DeferredConv) == (deferred and bool(isas)), fields
            expected = conv.apply(variables, inputs)
            np.testing.assert_allclose(out.compute() if isinstance(out, DeferredConv) else out, expected, rtol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "definition", "partial"])
def test_freeze_bn_freezes_every_way_of_naming_batch_norm(norm):
    """`freeze_bn` (`training.step.with_frozen_norm`): in training mode the frozen model normalizes with the
    running statistics (so its logits are the inference logits) and leaves them unchanged, whether the norm is the
    config string or a `BatchNorm` definition."""
    import functools

    from resnext_jax.models import BasicBlock, ResNet
    from resnext_jax.training.step import with_frozen_norm

    norm_def = {"batch": "batch", "definition": BatchNorm, "partial": functools.partial(BatchNorm, momentum=0.8)}
    model = ResNet(stage_sizes=(1,), block_cls=BasicBlock, num_classes=3, num_filters=8, norm=norm_def[norm])
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])  # running statistics unlike the batch's
    variables = {"params": variables["params"], "batch_stats": stats}
    expected = model.apply(variables, x, train=False)
    logits, updates = with_frozen_norm(model).apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(ours, theirs)
    unfrozen, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(unfrozen, expected, atol=1e-3)  # the check above can fail
