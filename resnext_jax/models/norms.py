"""The norms: batch norm with `flax.linen.BatchNorm`'s variables (its native CPU fusions behind `ops.fusion`),
group norm with the same call, and the config strings that name them.

Both are called as `norm(name=...)(x, residual=None, act=None)` and return `act(norm(x) + residual)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.errors import InputError
from resnext_jax.ops.batch_norm import batch_norm_train
from resnext_jax.ops.fusion import (
    Deferred,
    DeferredConv,
    add_act,
    affine_add_relu,
    conv_norm_matmul,
    epilogue_applies,
    materialize,
    matmul_epilogue_applies,
)

Dtype = Any
ModuleDef = Any


class BatchNorm(nn.Module):
    """Batch norm over the last axis with `flax.linen.BatchNorm`'s variables and update rule.

    Params `scale` and `bias`, batch statistics `mean` and `var` (float32), running averages updated as
    `momentum * old + (1 - momentum) * batch` with the biased batch variance, exactly as flax's, so
    checkpoints and converted weights are the same. Called as `bn(x, residual=None, act=None)`, it returns
    `act(bn(x) + residual)`; in training mode with `act=nn.relu` (or none) the add and the ReLU are fused
    into `batch_norm_train`'s hand-written backward pass, other activations are applied after it.

    `native_epilogue`: with a residual, ReLU (or no activation), float32 on a CPU where the native kernels
    are available, the epilogue runs as one native pass (in training, after the batch statistics)
    (`cpu.affine_add_relu`). XLA:CPU would otherwise fuse it into both of the next block's
    consumers and recompute every earlier block of the stage there (docs/benchmarks-history.md).
    With running statistics, `bn(x, defer=True)` (no residual, ReLU or no activation) returns a `Deferred`:
    for a shortcut, which the epilogue normalizes as it adds it (the residual may be a `Deferred` in every
    mode), or for a 1x1 conv's input, which `cpu.matmul_affine` normalizes as it reads it. `x` may be a
    `DeferredConv`: at inference the conv and this norm (with the residual and the ReLU) are then one
    `cpu.matmul_affine` (`ConvNormAct` makes these calls).

    `frozen`: use the running statistics in training too, and never update them (fine-tuning with small
    batches; the norm definition `NORM_LAYERS["frozen_batch"]`). `platform`: the backend it runs on (None:
    JAX's default backend).
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    native_epilogue: bool = False
    frozen: bool = False
    platform: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array | DeferredConv,
        residual: jax.Array | Deferred | None = None,
        act: Callable | None = None,
        defer: bool = False,
    ) -> jax.Array | Deferred:
        features = x.kernel.shape[-1] if isinstance(x, DeferredConv) else x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        platform = self.platform or jax.default_backend()
        use_running_average = self.use_running_average or self.frozen
        if isinstance(x, DeferredConv):
            if use_running_average and self.native_epilogue and matmul_epilogue_applies(x, residual, act):
                multiplier = scale * lax.rsqrt(ra_var.value + self.epsilon)
                return conv_norm_matmul(x, multiplier, bias - ra_mean.value * multiplier, residual, act is not None)
            x = x.compute()
        dtype = self.dtype or x.dtype
        if use_running_average:
            multiplier = scale * lax.rsqrt(ra_var.value + self.epsilon)
            if (
                self.native_epilogue
                and defer
                and residual is None
                and (act is None or act is nn.relu)
                and epilogue_applies(x, dtype, platform)
            ):
                return Deferred(x, ra_mean.value, multiplier, bias, relu=act is not None)
            if isinstance(residual, Deferred) and residual.relu:
                residual = materialize(residual)
            if residual is not None and self.native_epilogue and epilogue_applies(x, dtype, platform, residual, act):
                return affine_add_relu(x, ra_mean.value, multiplier, bias, residual, relu=act is not None)
            y = (x.astype(jnp.float32) - ra_mean.value) * multiplier + bias
            return add_act(y.astype(dtype), materialize(residual), act)
        if not self.is_initializing():
            _check_more_than_one_value(x.shape, self.axis_name)
        residual = materialize(residual)
        fuse = act is None or act is nn.relu
        y, mean, var = batch_norm_train(
            x.astype(dtype),
            scale,
            bias,
            residual if fuse else None,
            self.epsilon,
            fuse and act is not None,
            self.axis_name,
            self.native_epilogue,
            platform,
        )
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y if fuse else add_act(y, residual, act)


def _check_more_than_one_value(shape: tuple[int, ...], axis_name: str | None) -> None:
    """torch's "Expected more than 1 value per channel when training": with one value per channel the batch
    statistics normalize every output to 0 (the bias), so the logits are constant and no gradient reaches the
    layers before. Shapes are static, so this costs nothing at run time."""
    count = 1
    for size in shape[:-1]:
        count *= size
    if axis_name is not None:
        count *= lax.axis_size(axis_name)
    if count == 1:
        raise InputError(
            f"BatchNorm in training got 1 value per channel (input {tuple(shape)}): every output would be 0 and no "
            f"gradient would reach the earlier layers; train with a batch of 2 or more images (or a larger "
            f"image size), or use train=False"
        )


class GroupNorm(nn.Module):
    """GroupNorm with `BatchNorm`'s call (`residual`, `act`), falling back to fewer groups when the channels do
    not divide by `num_groups`. Fields it does not use (`use_running_average`, ...) are accepted, so a network
    binds either norm the same way."""

    num_groups: int = 32
    dtype: Dtype | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x, residual=None, act=None, defer=False):
        """`defer` is accepted for `BatchNorm`'s interface; group norm always applies itself."""
        x = materialize(x)
        channels = x.shape[-1]
        groups = next(g for g in range(min(self.num_groups, channels), 0, -1) if channels % g == 0)
        y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, scale_init=self.scale_init, name="gn")(x)
        return add_act(y, materialize(residual), act)


# Config strings -> norm definitions ("frozen_batch": batch norm on its running statistics, even in training,
# for fine-tuning with small batches: `config.freeze_bn`).
NORM_LAYERS: dict[str, ModuleDef] = {
    "batch": BatchNorm,
    "group": GroupNorm,
    "frozen_batch": functools.partial(BatchNorm, frozen=True),
}
NORMS = tuple(NORM_LAYERS)


def frozen_norm(norm: str | ModuleDef) -> str | ModuleDef:
    """`norm` with its statistics frozen: 'batch' becomes 'frozen_batch', a `BatchNorm` definition gets
    `frozen=True`; group norm (no statistics) and anything already frozen stay as they are."""
    if isinstance(norm, str):
        return "frozen_batch" if norm == "batch" else norm
    cls = norm
    while isinstance(cls, functools.partial):
        cls = cls.func
    return functools.partial(norm, frozen=True) if isinstance(cls, type) and issubclass(cls, BatchNorm) else norm


def norm_layer(norm: str | ModuleDef, groups: int = 32) -> ModuleDef:
    """The norm definition for a config string ('batch', 'group', 'frozen_batch') or a definition itself."""
    if not isinstance(norm, str):
        return norm
    if norm not in NORM_LAYERS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS}")
    return functools.partial(GroupNorm, num_groups=groups) if norm == "group" else NORM_LAYERS[norm]
