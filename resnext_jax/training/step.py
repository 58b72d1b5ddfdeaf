"""The train state and the per-replica train and eval steps, as `jax.jit(jax.shard_map(...))` over the mesh axis
`data`.

Inside the shard_map every device sees its own slice of the global batch, exactly as under `pmap`: BatchNorm
synchronizes its statistics through the axis name (the model is built with `bn_axis_name="data"`), and
gradients and metrics are averaged with `lax.pmean`. Plain `jit` auto-sharding would all-gather the batch
around every grouped conv (openxla/xla#47945), which is why the steps use shard_map.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resnext_jax.models.init import init_variables  # noqa: F401  (loop.py and the tests import it from here)
from resnext_jax.models.norms import BatchNorm, GroupNorm, frozen_norm
from resnext_jax.ops import inference_compiler_options, step_compiler_options
from resnext_jax.parallel import AXIS


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds besides the data-iterator position.

    Attributes:
      step: optimizer steps taken (int32 scalar).
      params: float32 model parameters.
      batch_stats: float32 BatchNorm running statistics ({} for group norm).
      opt_state: optax state.
      rng: base PRNG key (uint32[2]); step and device indices are folded in.
      ema_params, ema_batch_stats: exponential moving average of the weights ({} when EMA is off).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any
    ema_batch_stats: Any


def create_train_state(tx: optax.GradientTransformation, variables: dict, rng: jax.Array, use_ema: bool) -> TrainState:
    """Wraps model `variables` (random or converted torchvision weights) and a fresh optimizer state."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    # The EMA starts as a copy: the step donates the state, and one buffer cannot be donated twice.
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree) if use_ema else {}  # noqa: E731
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=rng,
        ema_params=copy(params),
        ema_batch_stats=copy(batch_stats),
    )


def with_frozen_norm(model: nn.Module) -> nn.Module:
    """`model` with its batch norms frozen (running statistics in training too, never updated), whether its norm
    is the string 'batch' or a `BatchNorm` definition (`models.norms.frozen_norm`); group norm stays."""
    return model.clone(norm=frozen_norm(model.norm)) if hasattr(model, "norm") else model


def _norm_param_mask(params, batch_stats):
    """True for the parameters of modules that have BatchNorm statistics (their scale and bias)."""
    stats_paths = {path[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]}
    return jax.tree_util.tree_map_with_path(lambda path, _: path[:-1] in stats_paths, params)


def cross_entropy_top1(logits: jax.Array, targets: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy against (soft) `targets` and mean top-1 against integer `labels`."""
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    top1 = (jnp.argmax(logits, -1) == labels).mean()
    return loss, top1


class LossAndGrads(NamedTuple):
    """What `loss_and_grads` returns for one device's batch."""

    loss: jax.Array  # mean softmax cross-entropy (float32 scalar)
    top1: jax.Array  # fraction of the batch whose top logit is the label (float32 scalar)
    batch_stats: Any  # the BatchNorm statistics updated by this batch (unchanged under freeze_bn; {} for group norm)
    grads: Any  # d loss / d params, a params-shaped tree


def loss_and_grads(
    model: nn.Module,
    params,
    batch_stats,
    images: jax.Array,
    targets: jax.Array,
    labels: jax.Array,
    dropout_rng: jax.Array,
    *,
    freeze_bn: bool = False,
) -> LossAndGrads:
    """The training forward and backward on one device's batch: the loss, top-1 and gradients of every train step.

    `images` is (B, H, W, 3), `targets` (B, num_classes) probabilities (one-hot, smoothed or mixed) and `labels`
    (B,) int32 for top-1. BatchNorm normalizes with the batch's statistics and updates its running ones; with
    `freeze_bn` it uses the running statistics and leaves them as they are. Nothing is averaged across devices
    here: the caller's step does that (`make_train_step`), or runs on one device (the step benchmark).
    """
    module = with_frozen_norm(model) if freeze_bn else model

    def per_device_loss(params):
        logits, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        new_stats = batch_stats if freeze_bn else updates.get("batch_stats", batch_stats)
        loss, top1 = cross_entropy_top1(logits, targets, labels)
        return loss, (new_stats, top1)

    (loss, (new_stats, top1)), grads = jax.value_and_grad(per_device_loss, has_aux=True)(params)
    return LossAndGrads(loss, top1, new_stats, grads)


_STAGE_PREFIX = re.compile(r"^((?:layer|block)\d+)_")


def stage_name(module_name: str) -> str:
    """The stage a top-level module belongs to: 'stem', the model's own stage names ('layer1'..'layer4' for
    ResNets, 'block1'..'block4' for RegNets, as in `stage_specs`), or 'head' (the classifier `fc`)."""
    if module_name == "fc":
        return "head"
    match = _STAGE_PREFIX.match(module_name)
    return match.group(1) if match else "stem"


def stage_norms(tree) -> dict[str, jax.Array]:
    """The L2 norm of each stage's part of a params-shaped tree (the root of the sum of squares of its leaves);
    the global norm is the root of the sum of their squares."""
    squares: dict[str, jax.Array] = {}
    for module_name, subtree in tree.items():
        stage = stage_name(module_name)
        total = sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree_util.tree_leaves(subtree))
        squares[stage] = squares.get(stage, 0.0) + total
    return {stage: jnp.sqrt(value) for stage, value in squares.items()}


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    num_classes: int,
    label_smoothing: float = 0.0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
    freeze_bn: bool = False,
    stage_diagnostics: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns `train_step(state, batch) -> (state, metrics)`, jitted, with `state` donated.

    `batch` is {'image': (B, H, W, 3) float, 'label': (B,) int32}, sharded along `data` over `mesh`;
    B must divide by `mesh.size * grad_accum_steps`. Metrics (float32 scalars, replicated): loss, top1,
    grad_norm, param_norm, learning_rate, and with `stage_diagnostics` `grad_norm/<stage>` and
    `param_norm/<stage>` for stem, each stage and head (see `stage_name`): a few reductions over trees the step
    already holds.
    """

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
        mix_rng, dropout_rng = jax.random.split(rng)
        images, labels = batch["image"], batch["label"]
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from resnext_jax.data import mixup_cutmix

            images, targets = mixup_cutmix(
                mix_rng,
                images,
                labels,
                num_classes,
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
            )
        else:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

        # Micro-batches run one after another in an unrolled Python loop: XLA:CPU runs convs inside a
        # lax.scan/while body about 10x slower, and grad_accum_steps is small.
        batch_stats, grads, loss, top1 = state.batch_stats, None, 0.0, 0.0
        size = images.shape[0] // grad_accum_steps
        for index in range(grad_accum_steps):
            part = slice(index * size, (index + 1) * size)
            micro_loss, micro_top1, batch_stats, micro_grads = loss_and_grads(
                model,
                state.params,
                batch_stats,
                images[part],
                targets[part],
                labels[part],
                jax.random.fold_in(dropout_rng, index),
                freeze_bn=freeze_bn,
            )
            grads = micro_grads if grads is None else jax.tree_util.tree_map(jnp.add, grads, micro_grads)
            loss, top1 = loss + micro_loss, top1 + micro_top1
        scale = 1.0 / grad_accum_steps
        grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
        # Per-replica semantics: average gradients and metrics over devices explicitly.
        grads = jax.lax.pmean(grads, AXIS)
        loss, top1 = jax.lax.pmean((loss * scale, top1 * scale), AXIS)
        if freeze_bn:
            mask = _norm_param_mask(grads, state.batch_stats)
            grads = jax.tree_util.tree_map(lambda g, m: jnp.zeros_like(g) if m else g, grads, mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params, ema_stats = state.ema_params, state.ema_batch_stats
        if ema_decay > 0:

            def ema(e, p):
                return ema_decay * e + (1.0 - ema_decay) * p

            ema_params = jax.tree_util.tree_map(ema, ema_params, params)
            ema_stats = jax.tree_util.tree_map(ema, ema_stats, batch_stats)
        metrics = dict(
            loss=loss,
            top1=top1,
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
            learning_rate=schedule(state.step),
        )
        if stage_diagnostics:
            metrics.update({f"grad_norm/{stage}": norm for stage, norm in stage_norms(grads).items()})
            metrics.update({f"param_norm/{stage}": norm for stage, norm in stage_norms(params).items()})
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_params,
            ema_batch_stats=ema_stats,
        )
        return new_state, metrics

    # check_vma=False keeps pmap's semantics: gradients w.r.t. replicated params stay per-device until the
    # explicit pmean above (with vma checking, JAX would insert an implicit psum in the transpose).
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(sharded, donate_argnums=(0,), compiler_options=step_compiler_options(_platform(mesh)))


def _relu_outputs(outputs: list):
    """A method interceptor that appends (stage, ReLU output) for every ReLU the model applies in training mode:
    each norm called with an activation and no residual (stems, a block's inner norms), and each block's output
    (its last norm, shortcut add and activation, fused or not). Blocks under `scan_blocks` (`*_rest`) run inside
    a scan body, whose values cannot leave it, and SE's squeeze ReLU are left out."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(out, jax.Array):
            return out
        path = context.module.scope.path if context.module.scope is not None else ()
        if not path or path[0].endswith("_rest"):
            return out
        if isinstance(context.module, (nn.BatchNorm, BatchNorm, GroupNorm)):
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            act = args[2] if len(args) > 2 else kwargs.get("act")
            if act is not None and residual is None:
                outputs.append((stage_name(path[0]), out))
        elif len(path) == 1 and _STAGE_PREFIX.match(path[0]):
            outputs.append((stage_name(path[0]), out))
        return out

    return interceptor


def make_dead_relu_step(model: nn.Module, mesh: Mesh) -> Callable[[dict, dict], dict]:
    """Returns `dead_relu(variables, batch) -> {'dead_relu/<stage>': fraction}`, jitted over the mesh.

    A ReLU unit (one channel of one ReLU's output) is dead on a batch when it is zero at every position of every
    image on every device; the fraction is over all of a stage's ReLU units. It runs the training-mode forward
    (batch statistics, statistics updates discarded) on the batch it is given, e.g. the logged step's batch:
    once per log step it costs about a third of a train step, nothing on other steps. Models with another
    activation return {}.
    """
    if getattr(model, "activation", "relu") != "relu":
        return lambda variables, batch: {}

    def step(variables, batch):
        outputs = []
        with nn.intercept_methods(_relu_outputs(outputs)):
            model.apply(
                variables, batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
            )
        dead, units = {}, {}
        for stage, out in outputs:
            alive = jax.lax.pmax(jnp.any(out != 0, axis=tuple(range(out.ndim - 1))).astype(jnp.int32), AXIS)
            dead[stage] = dead.get(stage, 0) + jnp.sum(1 - alive)
            units[stage] = units.get(stage, 0) + alive.size
        return {f"dead_relu/{stage}": dead[stage] / units[stage] for stage in dead}

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
    return jax.jit(sharded, compiler_options=inference_compiler_options(_platform(mesh)))


def make_eval_step(model: nn.Module, mesh: Mesh) -> Callable[[dict, dict], dict]:
    """Returns `eval_step(variables, batch) -> sums`, jitted over the mesh.

    `batch` has 'image', 'label' and a boolean 'mask' (False on padding rows). Returns global sums (replicated):
    loss (cross-entropy), top1, top5 (correct counts) and count (real examples), so padded rows never count.
    """

    def step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], axis=-1)
        top1 = jnp.argmax(logits, -1) == labels
        sums = dict(
            loss=jnp.sum(loss * mask), top1=jnp.sum(top1 * mask), top5=jnp.sum(top5 * mask), count=jnp.sum(mask)
        )
        return jax.lax.psum(sums, AXIS)

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
    return jax.jit(sharded, compiler_options=inference_compiler_options(_platform(mesh)))


def _platform(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform
