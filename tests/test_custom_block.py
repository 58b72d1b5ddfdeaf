"""A user's own block, written in a test file from the public conv/norm definitions only, trains on CPU with the
native kernels still computing its grouped convs, and matches the same network on pure-XLA convolutions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnext_jax import cpu
from resnext_jax.models import ResidualBlock, ResNet, SqueezeExcite, bottleneck_width


class SEResNeXtBlock(ResidualBlock):
    """A ResNeXt bottleneck with squeeze-excitation before the add, as a newcomer would write it: plain calls of
    the `conv` and `norm` definitions the network hands every block (no conv-norm unit, no fusion)."""

    filters: int
    cardinality: int = 1
    bottleneck_width: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x, drop_path_rate=None):
        width = bottleneck_width(self.filters, self.bottleneck_width, self.cardinality)
        out = self.filters * self.expansion
        y = self.norm(name="bn1")(self.conv(width, (1, 1), name="conv1")(x), act=self.act)
        y = self.conv(width, (3, 3), (self.strides, self.strides), groups=self.cardinality, name="conv2")(y)
        y = self.norm(name="bn2")(y, act=self.act)
        y = self.norm(name="bn3")(self.conv(out, (1, 1), name="conv3")(y))
        y = SqueezeExcite(out // 16, conv=self.conv, name="se")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out:
            shortcut = self.conv(out, (1, 1), (self.strides, self.strides), name="downsample_conv")(x)
            shortcut = self.norm(name="downsample_bn")(shortcut)
        return self.act(y + shortcut)


def _model(conv_impl):
    # 8 groups of 4 channels (32 wide) in layer1 and of 8 in layer2: shapes the native grouped conv takes.
    return ResNet(
        stage_sizes=(1, 1),
        block_cls=SEResNeXtBlock,
        cardinality=8,
        bottleneck_width=4,
        num_classes=5,
        small_stem=True,
        conv_impl=conv_impl,
    )


def _train_step(model):
    def loss_fn(params, stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_custom_block_trains_with_native_kernels_and_matches_xla():
    if not cpu.available():
        pytest.skip(
            f"native kernels unavailable ({cpu.unavailable_reason()}): "
            "tests/test_grouped_conv.py::test_native_builds_wherever_it_can says why"
        )
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    labels = jnp.array([0, 1, 2, 3])
    native, xla = _model("auto"), _model("xla")
    variables = native.init(jax.random.PRNGKey(0), images[:1])
    assert "se" in variables["params"]["layer1_0"] and variables["params"]["layer1_0"]["conv2"]["kernel"].shape == (
        3,
        3,
        4,
        32,
    )
    args = (variables["params"], variables["batch_stats"], images, labels)
    step = _train_step(native)
    hlo = step.lower(*args).as_text()
    # The grouped convs' forward and kernel gradient run in the native kernels.
    assert "resnext_jax_grouped_conv_forward" in hlo and "resnext_jax_grouped_conv_kernel_grad" in hlo
    (loss, stats), grads = step(*args)
    (loss_x, stats_x), grads_x = _train_step(xla)(*args)
    assert abs(float(loss) - float(loss_x)) <= 1e-5 * max(1.0, abs(float(loss_x)))
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * float(jnp.abs(theirs).max() + 1e-6))
    for ours, theirs in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_x)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # And a real update moves the loss down on this batch.
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    (loss_after, _), _ = step(params, stats, images, labels)
    assert float(loss_after) < float(loss)
