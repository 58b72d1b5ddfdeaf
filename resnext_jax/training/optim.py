"""Optimizer and learning-rate schedule: AdamW or SGD-Nesterov, linear warmup then cosine decay.

Weight decay skips norm scales and biases (every parameter with fewer than 2 dimensions).
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def create_learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 to `config.learning_rate` over `warmup_epochs`, then cosine decay to
    `learning_rate * end_learning_rate_ratio` at `num_epochs`. Steps are optimizer steps."""
    total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=config.learning_rate * config.end_learning_rate_ratio,
    )


def weight_decay_mask(params) -> dict:
    """True for parameters that get weight decay: conv and dense kernels; False for norm scales and biases."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def _head_labels(params) -> dict:
    """'head' for the classifier (top-level 'fc'), 'backbone' for everything else."""
    return {
        name: jax.tree_util.tree_map(lambda _: "head" if name == "fc" else "backbone", sub)
        for name, sub in params.items()
    }


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, params=None
) -> optax.GradientTransformation:
    """The optax chain the config asks for: clipping, then AdamW or SGD-Nesterov with masked weight decay.

    With `backbone_lr_mult != 1`, updates of every parameter except the `fc` head are scaled by it
    (needs `params` to label the tree).
    """

    def base(learning_rate):
        if config.optimizer == "adamw":
            return optax.adamw(
                learning_rate,
                b1=config.adam_b1,
                b2=config.adam_b2,
                weight_decay=config.weight_decay,
                mask=weight_decay_mask,
            )
        if config.optimizer == "sgd":
            return optax.chain(
                optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
                optax.sgd(learning_rate, momentum=config.momentum, nesterov=True),
            )
        raise ValueError(f"config.optimizer={config.optimizer!r} is not supported; use 'adamw' or 'sgd'")

    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.backbone_lr_mult != 1.0:
        if params is None:
            raise ValueError("backbone_lr_mult needs the params to tell the head from the backbone")
        backbone = base(lambda step: schedule(step) * config.backbone_lr_mult)
        parts.append(optax.multi_transform({"head": base(schedule), "backbone": backbone}, _head_labels(params)))
    else:
        parts.append(base(schedule))
    return optax.chain(*parts)
