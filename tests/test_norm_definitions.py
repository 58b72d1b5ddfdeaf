"""`create_model(norm=<definition>, conv=<definition>)` work as the README says, and a norm that keeps running
statistics but cannot sync them is refused where the trainer syncs them."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import resnext_jax
from resnext_jax.models import Conv2d

IMAGES = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))


def test_a_flax_group_norm_definition_equals_the_group_norm_string():
    """flax's own nn.GroupNorm (called on x alone) gives the logits of norm='group' with the same variables."""
    plain = resnext_jax.create_model("resnet18", num_classes=5, norm=functools.partial(nn.GroupNorm, num_groups=8))
    ours = resnext_jax.create_model("resnet18", num_classes=5, norm="group", norm_groups=8)
    variables = plain.init(jax.random.key(0), IMAGES, train=False)
    # Random affine parameters, so that a norm applied in the wrong place cannot hide behind scale 1, bias 0.
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    # Our GroupNorm holds flax's under `gn`: the same variables one level down.
    ours_keys = traverse_util.flatten_dict(ours.init(jax.random.key(0), IMAGES, train=False))
    moved = {tuple(p for p in key if p != "gn"): key for key in ours_keys}
    flat = traverse_util.flatten_dict(variables)
    assert set(moved) == set(flat)
    ours_variables = traverse_util.unflatten_dict({moved[k]: v for k, v in flat.items()})
    np.testing.assert_allclose(
        plain.apply(variables, IMAGES, train=False),
        ours.apply(ours_variables, IMAGES, train=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_flax_batch_norm_definition_trains_like_the_batch_string():
    """flax's nn.BatchNorm in training: the same logits and running statistics as norm='batch'."""
    plain = resnext_jax.create_model("resnet18", num_classes=5, norm=functools.partial(nn.BatchNorm, momentum=0.9))
    ours = resnext_jax.create_model("resnet18", num_classes=5)
    variables = ours.init(jax.random.key(0), IMAGES, train=False)
    results = [
        model.apply(variables, IMAGES, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
        for model in (plain, ours)
    ]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_conv_definition_keeps_its_own_fields():
    """conv=partial(Conv2d, impl='xla') gives the default model's logits (the definition's impl is kept)."""
    xla = resnext_jax.create_model("resnext50_32x4d", num_classes=5, conv=functools.partial(Conv2d, impl="xla"))
    default = resnext_jax.create_model("resnext50_32x4d", num_classes=5)
    variables = default.init(jax.random.key(0), IMAGES, train=False)
    np.testing.assert_allclose(
        xla.apply(variables, IMAGES, train=False), default.apply(variables, IMAGES, train=False), rtol=1e-4, atol=1e-4
    )


class RunningMeanOnly(nn.Module):
    """A norm with running statistics and no axis_name: it cannot sync them across devices."""

    use_running_average: bool = False
    scale_init: object = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        mean = self.variable("batch_stats", "mean", jnp.zeros, (x.shape[-1],))
        if not self.use_running_average:
            mean.value = x.mean((0, 1, 2))
        return (x - mean.value) * self.param("scale", self.scale_init, (x.shape[-1],))


def test_a_norm_without_axis_name_is_refused_where_statistics_are_synced():
    model = resnext_jax.create_model("resnet18", num_classes=5, norm=RunningMeanOnly, bn_axis_name="batch")
    variables = model.init(jax.random.key(0), IMAGES, train=False)  # inference syncs nothing: fine
    with pytest.raises(ValueError, match="RunningMeanOnly keeps running statistics but has no axis_name field"):
        model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])


def test_a_field_that_is_neither_a_name_nor_a_definition_names_both():
    with pytest.raises(Exception, match="or a norm definition"):
        resnext_jax.create_model("resnet18", norm="layer")
