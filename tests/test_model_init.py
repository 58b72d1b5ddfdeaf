"""`resnext_jax.models.init` (one way to create variables) and the training system's `loss_and_grads`, each
against a second implementation: `model.init` called directly, and the loss and gradients written out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnext_jax
from resnext_jax.models.init import init_variables, input_shape, variable_shapes
from resnext_jax.training.step import loss_and_grads


def tiny_model(**fields):
    """A one-stage ResNeXt with 4 groups: seconds to trace and run at 16x16."""
    return resnext_jax.create_model(
        "resnext50_32x4d",
        num_classes=10,
        stage_sizes=(1,),
        num_filters=8,
        cardinality=4,
        bottleneck_width=32,
        small_stem=True,
        **fields,
    )


def test_init_variables_is_model_init_on_a_zero_batch():
    model = tiny_model()
    variables = init_variables(model, jax.random.key(3), image_size=(16, 24))
    expected = model.init(jax.random.key(3), jnp.zeros((1, 16, 24, 3)), train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)  # jit fuses the initializers' math: 1-ulp differences


def test_variable_shapes_match_the_initialized_tree_without_computing_it():
    model = tiny_model()
    shapes = variable_shapes(model, 16)
    variables = init_variables(model, jax.random.key(0), 16)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), variables)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("image_size, batch", [(0, 1), ((16,), 1), ((16, 16, 3), 1), (16.5, 1), (16, 0), (True, 1)])
def test_bad_input_sizes_name_the_fix(image_size, batch):
    with pytest.raises(ValueError, match="use a positive number of pixels"):
        input_shape(image_size, batch)
    assert input_shape((32, 24), batch=2) == (2, 32, 24, 3)


def _batch(num_classes=10):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray([1, 3, 3, 7], jnp.int32)
    targets = 0.9 * jax.nn.one_hot(labels, num_classes) + 0.1 / num_classes
    return images, targets, labels


def test_loss_and_grads_match_cross_entropy_written_out():
    model = tiny_model()
    variables = init_variables(model, jax.random.key(0), 16)
    images, targets, labels = _batch()

    def reference(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
        )
        loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
        return loss, (updates["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == labels))

    (loss, (stats, top1)), grads = jax.value_and_grad(reference, has_aux=True)(variables["params"])
    out = loss_and_grads(
        model, variables["params"], variables["batch_stats"], images, targets, labels, jax.random.key(1)
    )
    np.testing.assert_allclose(out.loss, loss, rtol=1e-6)
    np.testing.assert_allclose(out.top1, top1)
    for got, want in zip(jax.tree.leaves((out.grads, out.batch_stats)), jax.tree.leaves((grads, stats))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # The batch moved the running statistics: they are the updated ones, not the ones passed in.
    assert not np.allclose(out.batch_stats["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])


def test_frozen_batch_norm_loss_is_the_inference_forward_and_keeps_the_statistics():
    model = tiny_model()
    variables = init_variables(model, jax.random.key(0), 16)
    # Running statistics other than init's zeros and ones, so that using them differs from batch statistics.
    variables["batch_stats"] = jax.tree.map(lambda a: a + 0.1, variables["batch_stats"])
    images, targets, labels = _batch()
    out = loss_and_grads(
        model, variables["params"], variables["batch_stats"], images, targets, labels, jax.random.key(1), freeze_bn=True
    )
    logits = model.apply(variables, images, train=False)
    np.testing.assert_allclose(out.loss, -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(out.batch_stats), jax.tree.leaves(variables["batch_stats"])):
        np.testing.assert_array_equal(got, want)
