"""The JAX step the step benchmark times: the training system's forward, loss and gradients (`loss_and_grads`)
plus an AdamW update, jitted for one device; or the inference forward.

benchmarks/ab.py imports this module from the working tree and then times models imported from other git
revisions with it, so the loss, gradients and initializer are bound here at import time; only the compiler
options are looked up in the imported `resnext_jax.ops` when a step is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from resnext_jax.models.init import init_variables
from resnext_jax.training.step import loss_and_grads


def make_jax_step(model, mode: str, batch: int, resolution: int, num_classes: int = 1000):
    """Returns `(step, state, inputs)` for one jitted train or inference step on one device.

    The train step is `train_step`'s (the training system's loss and gradients, then `optax.adamw`) on
    random (batch, resolution, resolution, 3) NHWC images and labels; its state is donated. The inference
    step is `model.apply(variables, images, train=False)`.
    """
    from resnext_jax import ops
    from resnext_jax.ops import step_compiler_options

    # benchmarks/ab.py runs this with older revisions of the package too, from before the inference options.
    inference_compiler_options = getattr(ops, "inference_compiler_options", step_compiler_options)

    rng = jax.random.key(0)
    images = jax.random.normal(rng, (batch, resolution, resolution, 3), jnp.float32)
    labels = jax.random.randint(rng, (batch,), 0, num_classes)
    variables = init_variables(model, rng, resolution)
    if mode == "infer":
        step = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=inference_compiler_options())
        return step, variables, (images,)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    state = (variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]))  # {}: group norm
    step = jax.jit(train_step(model, tx, num_classes), donate_argnums=(0,), compiler_options=step_compiler_options())
    return step, state, (images, labels)


def train_step(
    model, tx: optax.GradientTransformation, num_classes: int, axis_name: str | None = None, update: bool = True
):
    """`(state, images, labels) -> (state, loss)` with `state = (params, batch_stats, opt_state)`.

    The forward, loss and gradients are `resnext_jax.training.step.loss_and_grads` against one-hot targets;
    with `axis_name` (inside a shard_map), gradients and loss are averaged over it as the train step does.
    `update=False` stops after the (averaged) gradients and returns `(grads, loss)`: the part of the step
    whose work data parallelism splits; the optimizer update runs on every device's full copy of the params.
    """

    def step(state, images, labels):
        params, batch_stats, opt_state = state
        out = loss_and_grads(
            model, params, batch_stats, images, jax.nn.one_hot(labels, num_classes), labels, jax.random.key(0)
        )
        grads, loss = out.grads, out.loss
        if axis_name:
            grads, loss = jax.lax.pmean((grads, loss), axis_name)
        if not update:
            return grads, loss
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), out.batch_stats, opt_state), loss

    return step
