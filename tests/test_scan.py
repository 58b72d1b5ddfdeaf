"""`scan_blocks=True`: same math as the default layout, exact layout round trip, torchvision parity."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch_reference import randomized_torchvision, torch_logits

import resnext_jax
from resnext_jax.convert import from_torchvision, to_torchvision
from resnext_jax.models import DropPath, stack_blocks, unstack_blocks

# Tiny models that still have stages of 1, 2 and 3 blocks, grouped convs, projections and SE.
TINY = {
    "resnext": (
        "resnext50_32x4d",
        dict(stage_sizes=(2, 3, 1), num_filters=16, cardinality=4, bottleneck_width=16, num_classes=10),
    ),
    "regnet_y": ("regnet_y_400mf", dict(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, num_classes=10)),
}


def _models(key, **extra):
    name, fields = TINY[key]
    return (
        resnext_jax.create_model(name, **fields, **extra),
        resnext_jax.create_model(name, **fields, scan_blocks=True, **extra),
    )


def _init(model, images):
    return jax.jit(lambda x: model.init(jax.random.key(0), x))(images)


def _randomize_stats(variables, seed=1):
    """Random BN statistics, so a block swap or a transposed stack would change the output."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    stats = jax.tree.map(lambda s: s + 0.1 * jax.random.uniform(next(keys), s.shape), variables["batch_stats"])
    return {**variables, "batch_stats": stats}


@pytest.mark.parametrize("key", sorted(TINY))
def test_layout_round_trip_is_exact_and_matches_init(key):
    plain, scanned = _models(key)
    x = jnp.zeros((1, 32, 32, 3))
    variables = _init(plain, x)
    stacked = stack_blocks(variables)
    expected = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x))
    assert jax.tree.structure(stacked) == jax.tree.structure(expected)
    assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, expected)
    assert any(name.endswith("_rest") for name in stacked["params"])
    back = unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, variables)))
    assert jax.tree.structure(unstack_blocks(variables)) == jax.tree.structure(variables)  # no-op on default layout


@pytest.mark.slow  # 12-14 s per model; CI runs it
@pytest.mark.parametrize("key", sorted(TINY))
def test_scanned_logits_stats_and_gradients_equal_unscanned(key):
    plain, scanned = _models(key)
    images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10
    variables = _randomize_stats(_init(plain, images))
    stacked = stack_blocks(variables)
    infer = lambda model, v: jax.jit(lambda v: model.apply(v, images))(v)  # noqa: E731
    np.testing.assert_allclose(infer(scanned, stacked), infer(plain, variables), rtol=1e-5, atol=1e-5)

    def loss_fn(model):
        def loss(params, batch_stats):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (loss_p, updates_p), grads_p = loss_fn(plain)(variables["params"], variables["batch_stats"])
    (loss_s, updates_s), grads_s = loss_fn(scanned)(stacked["params"], stacked["batch_stats"])
    np.testing.assert_allclose(loss_s, loss_p, rtol=1e-6)
    grads_s = unstack_blocks({"params": grads_s})["params"]
    stats_s = unstack_blocks(updates_s)["batch_stats"]
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)),
        grads_s,
        grads_p,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_s, updates_p["batch_stats"])


def _seen_drop_path_rates(model, variables, images):
    """Every DropPath rate used in one train-mode forward, read at run time (scanned rates are traced)."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, DropPath) and context.method_name == "__call__":
            jax.debug.callback(lambda r: seen.append(round(float(r), 6)), jnp.asarray(context.module.rate))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.block_until_ready(
            jax.jit(
                lambda v: model.apply(
                    v, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)}
                )
            )(variables)
        )
    return sorted(seen)


def test_scanned_blocks_get_their_own_drop_path_rates():
    plain, scanned = _models("resnext", drop_path_rate=0.3)
    images = jnp.ones((2, 32, 32, 3))
    variables = _init(plain, images)
    expected = _seen_drop_path_rates(plain, variables, images)
    # Six blocks with rates 0 .. 0.3; block 0's static rate 0 needs no DropPath (its add and ReLU fuse into bn3).
    assert len(set(expected)) == 5 and max(expected) == pytest.approx(0.3)
    assert _seen_drop_path_rates(scanned, stack_blocks(variables), images) == expected


def test_stack_blocks_names_a_gap():
    with pytest.raises(ValueError, match="layer1 has blocks \\[1, 3\\]"):
        stack_blocks({"params": {"layer1_0": {}, "layer1_1": {"w": jnp.ones(2)}, "layer1_3": {"w": jnp.ones(2)}}})


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf"])
def test_torchvision_parity_with_scanned_blocks(name):
    reference = randomized_torchvision(name)
    variables = from_torchvision(name, reference, scan_blocks=True)
    assert any(k.endswith("_rest") for k in variables["params"])
    model = resnext_jax.create_model(name, scan_blocks=True)
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
    np.testing.assert_allclose(logits, torch_logits(reference, images), rtol=0, atol=1e-4)
    state = to_torchvision(name, variables)
    original = reference.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(state[key], value), key


# Groups of 2, 4 and 8 channels are merged into 16-channel chunks in the backward pass: one chunk, several
# chunks (32 channels in 4-channel groups), 8-channel groups two per chunk; 16-channel groups stay single.
# Convs with >= 16 input channels per group, at most 8 groups and outputs of at least 28x28 take their kernel
# gradient as per-tap matmuls (dense 30 and 57 stride 2; 2 groups at 28 and 57 stride 2); a strided dense conv
# with fewer channels and such an output by space-to-depth taps (the 3-channel 7x7/2 stem at even and odd sizes,
# a 4-channel 5x5/3 whose blocks the padding does not fill, a 2-channel 4x4/2). Strided convs with at most 8 chunks
# take their input gradient one output phase at a time, others dilated (16 chunks): odd and even sizes, a 1x1
# kernel smaller than its stride (phases no tap reaches), a 5x5 kernel and stride 3.
@pytest.mark.parametrize(
    "size,kernel,stride,groups,channels",
    [
        (15, 3, 2, 4, 8),
        (9, 7, 2, 1, 8),
        (6, 1, 2, 1, 8),
        (6, 3, 1, 2, 8),
        (7, 3, 1, 8, 32),
        (8, 3, 2, 8, 64),
        (5, 3, 1, 2, 32),
        (30, 3, 1, 1, 16),
        (57, 3, 2, 1, 16),
        (58, 7, 2, 1, 3),
        (10, 5, 2, 1, 8),
        (11, 3, 3, 1, 8),
        (11, 3, 3, 2, 8),
        (13, 5, 3, 4, 16),
        (28, 3, 1, 2, 32),
        (57, 3, 2, 2, 32),
        (6, 3, 2, 16, 256),
        (57, 7, 2, 1, 3),
        (85, 5, 3, 1, 4),
        (60, 4, 2, 1, 2),
    ],
)
def test_canonical_grad_conv_matches_autodiff(size, kernel, stride, groups, channels):
    from resnext_jax.ops import conv2d
    from resnext_jax.ops.conv_grad import conv2d_canonical_grad

    x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, channels // groups, math.lcm(12, groups)))
    pad = (((kernel - 1) // 2,) * 2,) * 2
    reference = jax.grad(
        lambda x, w: jnp.sum(conv2d(x, w, strides=(stride, stride), padding=pad, groups=groups, impl="xla") ** 2),
        (0, 1),
    )(x, w)
    ours = jax.grad(
        lambda x, w: jnp.sum(conv2d_canonical_grad(x, w, (stride, stride), pad, groups, "split") ** 2), (0, 1)
    )(x, w)
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def _kernel_grad_float64(x, dy, kernel, stride, pad):
    """dw[i, j, c, o] = sum over n, y, x of xpad[n, s*y + i, s*x + j, c] * dy[n, y, x, o], in float64."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = dy.shape[1:3]
    return np.stack(
        [
            np.stack(
                [
                    np.tensordot(
                        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride],
                        dy,
                        axes=([0, 1, 2], [0, 1, 2]),
                    )
                    for j in range(kernel)
                ]
            )
            for i in range(kernel)
        ]
    )


# The stem's kernel gradient by space-to-depth with output channels a multiple of 32 (on CPU, the native
# `few_channel_kernel_grad`): ResNet's 7x7/2 stem on 3 channels at even and odd sizes (64 outputs: two
# 32-channel blocks), RegNet's 3x3/2 stem (32 outputs), 5 channels at stride 2 (20 after space-to-depth) and
# 3 at stride 3 (27: an odd count, so the one-channel register block runs too), and 256 outputs over 200
# output rows (13 items of 16 rows, in two waves of partial sums).
@pytest.mark.parametrize(
    "size,kernel,stride,channels,out",
    [
        (58, 7, 2, 3, 64),
        (57, 7, 2, 3, 64),
        (33, 3, 2, 3, 32),
        (30, 5, 2, 5, 32),
        (31, 5, 3, 3, 32),
        (200, 7, 2, 5, 256),
    ],
)
def test_space_to_depth_kernel_grad_matches_float64(size, kernel, stride, channels, out):
    from resnext_jax.ops.conv_grad import _kernel_grad_space_to_depth

    x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
    pad = (kernel - 1) // 2
    ho = (size + 2 * pad - kernel) // stride + 1
    dy = jax.random.normal(jax.random.key(1), (2, ho, ho, out))
    dw = jax.jit(
        lambda x, dy: _kernel_grad_space_to_depth(x, dy, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)))
    )(x, dy)
    want = _kernel_grad_float64(x, dy, kernel, stride, pad)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mac_count_covers_every_scanned_block():
    from resnext_jax.summary import summarize

    plain = summarize("resnext50_32x4d", 64)
    scanned = summarize("resnext50_32x4d", 64, scan_blocks=True)
    assert scanned["gflops"] == pytest.approx(plain["gflops"], rel=1e-12)
    assert scanned["params"] == plain["params"]
