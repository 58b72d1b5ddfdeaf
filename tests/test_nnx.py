"""A model inside an NNX project: wrapped in `flax.nnx.bridge.ToNNX`, one training step with `nnx.value_and_grad`
updates the BatchNorm statistics and the parameters exactly as the linen step does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import bridge

from resnext_jax import create_model


def _linen_variables(wrapped) -> dict:
    """The wrapper's variables as linen's {'params': ..., 'batch_stats': ...}."""
    return {
        "params": nnx.to_pure_dict(nnx.state(wrapped, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(wrapped, nnx.BatchStat)),
    }


def test_to_nnx_train_step_matches_linen():
    model = create_model("resnet18", num_classes=7, num_filters=16)
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    labels = jnp.array([0, 3, 5, 6])

    wrapped = bridge.ToNNX(model, rngs=nnx.Rngs(0))
    bridge.lazy_init(wrapped, images[:1], train=False)
    # The wrapper holds the linen variables under the same names.
    linen_vars = _linen_variables(wrapped)
    assert jax.tree.structure(linen_vars["params"]) == jax.tree.structure(
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images[:1], train=False))["params"]
    )

    # linen: loss, gradients and the new statistics from the same starting variables.
    def linen_loss(params, stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    (loss_l, stats_l), grads_l = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(
        linen_vars["params"], linen_vars["batch_stats"]
    )

    # NNX: the wrapped module called with train=True updates its batch_stats in place.
    def nnx_loss(m):
        logits = m(images, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = nnx.Optimizer(wrapped, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(nnx_loss)(m)
        opt.update(m, grads)
        return loss, grads

    loss_n, grads_n = step(wrapped, optimizer)
    np.testing.assert_allclose(float(loss_n), float(loss_l), rtol=1e-5)
    grads_n = nnx.to_pure_dict(grads_n)
    for ours, theirs in zip(jax.tree.leaves(grads_n), jax.tree.leaves(grads_l)):
        # Two compilations of the same step: float32 summation order may differ.
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(jnp.abs(theirs).max()))
    after = _linen_variables(wrapped)
    # Statistics: the batch's, as linen's step returned them (and moved from their initial values).
    for ours, theirs in zip(jax.tree.leaves(after["batch_stats"]), jax.tree.leaves(stats_l)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(after["batch_stats"]), jax.tree.leaves(linen_vars["batch_stats"]))
    )
    # Parameters: one SGD step from the linen gradients.
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, linen_vars["params"], grads_l)
    for ours, theirs in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
