"""The fusions the native CPU kernels make possible between a conv, its norm, a shortcut and a ReLU.

A layer may hand the next one its work undone, so that a native kernel does both in one pass:
- `DeferredConv`: a dense 1x1 conv not yet computed; the batch norm after it computes conv, norm, shortcut and
  ReLU as one `cpu.matmul_affine` (inference, AVX2 builds);
- `Deferred`: an inference batch norm not yet applied; a residual block's last norm applies it to the shortcut
  as it adds it (`cpu.affine_add_relu`), or a 1x1 conv's matmul to its input as it reads it.
Anything else `materialize`s them first, which computes exactly what the layer would have. The conv-norm unit
(`models.layers.ConvNormAct`) is the only user: blocks never see these values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from resnext_jax import cpu


class Deferred(NamedTuple):
    """An inference batch norm not yet applied: `(x - mean) * multiplier + bias` per channel
    (`models.norms.BatchNorm(defer=True)`).

    A shortcut's batch norm is deferred so that the block's native epilogue applies it while it adds the
    shortcut, instead of XLA writing the normalized shortcut out first. `materialize` applies it.
    """

    x: jax.Array
    mean: jax.Array
    multiplier: jax.Array
    bias: jax.Array
    relu: bool = False  # a ReLU after the norm (`bn(x, act=nn.relu, defer=True)`, for a 1x1 conv's input)


def materialize(value: jax.Array | Deferred | DeferredConv) -> jax.Array:
    """`value` itself, a `Deferred` batch norm applied (in float32, returned in its input's dtype) or a
    `DeferredConv` computed."""
    if isinstance(value, DeferredConv):
        return value.compute()
    if not isinstance(value, Deferred):
        return value
    y = (value.x.astype(jnp.float32) - value.mean) * value.multiplier + value.bias
    return (jnp.maximum(y, 0.0) if value.relu else y).astype(value.x.dtype)


class DeferredConv(NamedTuple):
    """A dense 1x1 conv not yet computed (`models.layers.Conv2d(...)(x, defer=True)`), for the norm that follows it: at
    inference `BatchNorm` computes both as one `cpu.matmul_affine` (with a residual block's shortcut and
    ReLU), whose epilogue applies them to each register block before it is stored. Anywhere else the conv
    is computed as `Conv2d` would have (`materialize`)."""

    x: jax.Array  # the input at the conv's stride, (N, H', W', K)
    kernel: jax.Array  # (K, features)
    compute: Callable[[], jax.Array]  # the conv as `Conv2d` computes it
    prologue: tuple | None = None  # a `Deferred` input's (scale, shift, relu) per input channel, or None


def add_act(y: jax.Array, residual: jax.Array | None, act: Callable | None) -> jax.Array:
    if residual is not None:
        y = y + residual
    return act(y) if act is not None else y


def matmul_epilogue_applies(x: DeferredConv, residual, act) -> bool:
    """Whether `cpu.matmul_affine` can compute `act(bn(conv) + residual)` for a deferred conv: ReLU or no
    activation, a float32 residual (if any) of the conv's output shape."""
    if act is not None and act is not jax.nn.relu or isinstance(residual, DeferredConv):
        return False
    if residual is None:
        return True
    value = residual.x if isinstance(residual, Deferred) else residual
    return value.dtype == jnp.float32 and value.shape == (*x.x.shape[:-1], x.kernel.shape[-1])


def epilogue_applies(
    x: jax.Array, dtype, platform: str, residual: jax.Array | Deferred | None = None, act: Callable | None = None
) -> bool:
    """Whether `affine_add_relu` can compute `act(bn(x) + residual)` by the native kernel: float32 throughout,
    ReLU or no activation, a residual (if given) of `x`'s shape, on a CPU with the native kernels built."""
    residual = x if residual is None else residual.x if isinstance(residual, Deferred) else residual
    return cpu.eligible(
        "affine_add_relu",
        platform,
        x,
        residual,
        jax.ShapeDtypeStruct((), dtype),
        shape_ok=x.shape == residual.shape and (act is None or act is jax.nn.relu),
    )


def matmul_conv_applies(x: jax.Array, kernel: jax.Array, dtype, platform: str) -> bool:
    """Whether a dense 1x1 conv of `x` (NHWC) may be deferred to `cpu.matmul_affine`: float32, an AVX2 build
    (`cpu.matmul_preferred`) and a supported width."""
    return x.ndim == 4 and cpu.eligible(
        "matmul_affine",
        platform,
        x,
        kernel,
        shape_ok=cpu.matmul_preferred() and cpu.supports_matmul((1, x.shape[-1]), kernel.shape[2:], dtype),
    )


def conv_norm_matmul(x: DeferredConv, multiplier: jax.Array, shift: jax.Array, residual, relu: bool) -> jax.Array:
    """`relu(conv(x) * multiplier + shift + residual)` for a deferred 1x1 conv by one `cpu.matmul_affine`,
    the conv's own input norm (a `Deferred` input) applied as its rows are read."""
    rows, features = x.x.shape[:-1], x.kernel.shape[-1]
    if residual is not None:
        residual = materialize(residual).reshape(-1, features)
    prologue, prologue_relu = (x.prologue[:2], x.prologue[2]) if x.prologue else (None, False)
    y = cpu.matmul_affine(
        x.x.reshape(-1, x.x.shape[-1]),
        x.kernel,
        multiplier,
        shift,
        residual,
        relu=relu,
        prologue=prologue,
        prologue_relu=prologue_relu,
    )
    return y.reshape(*rows, features)


def affine_add_relu(y, mean, multiplier, bias, residual, relu: bool) -> jax.Array:
    """`relu((y - mean) * multiplier + bias + residual)` by `cpu.affine_add_relu`; a `Deferred` residual is
    normalized in the same pass."""
    shortcut = (residual.mean, residual.multiplier, residual.bias) if isinstance(residual, Deferred) else None
    return cpu.affine_add_relu(y, mean, multiplier, bias, residual.x if shortcut else residual, shortcut, relu=relu)
