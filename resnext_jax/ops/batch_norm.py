"""Training-mode batch norm with a hand-written backward pass, its add and ReLU fused (NHWC, channels last)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax import cpu
from resnext_jax.ops.fusion import add_act, epilogue_applies


def _native_sums_apply(x: jax.Array, use_native: bool, platform: str) -> bool:
    """Whether batch norm's per-channel sums run as `cpu.channel_sums`: asked for, float32, on a CPU with
    the native kernels built."""
    return use_native and cpu.eligible("channel_sums", platform, x)


def batch_moments(x: jax.Array, axis_name: str | None, use_native: bool = False, platform: str = "cpu"):
    """Per-channel mean and (biased) variance over all but the last axis, in float32, synced over `axis_name`."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = x.size // x.shape[-1]
    if _native_sums_apply(x, use_native, platform):
        sums, squares = cpu.channel_sums(x, x, jnp.zeros(x.shape[-1:], jnp.float32))
    else:
        sums, squares = jnp.sum(xf, axes), jnp.sum(xf * xf, axes)
    if axis_name is not None:
        sums, squares, count = lax.psum((sums, squares, count), axis_name)
    mean = sums / count
    # E[x^2] - E[x]^2, as flax.linen.BatchNorm's default (use_fast_variance) computes it.
    return mean, jnp.maximum(squares / count - mean * mean, 0.0), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    residual: jax.Array | None,
    epsilon: float,
    relu: bool,
    axis_name: str | None,
    use_native: bool = False,
    platform: str = "cpu",
):
    """Training-mode batch norm, `relu(bn(x) + residual)`, with a hand-written backward pass.

    Returns `(y, mean, var)`: the output in `x.dtype` and the batch's float32 mean and biased variance
    (synchronized over `axis_name` when given, under shard_map/pmap). The same math as
    `flax.linen.BatchNorm` followed by the add and the ReLU, but the backward is one fused reduction and
    one elementwise pass from the saved input and output, where autodiff of the unfused ops leaves XLA:CPU
    more passes over the activations (docs/benchmarks-history.md). The cotangents of `mean` and `var` are ignored:
    they only feed the running statistics.

    `use_native`: with a residual, float32, on a CPU with the native kernels, the forward's normalize, add and
    ReLU run as `cpu.affine_add_relu` (once the statistics are reduced), which keeps XLA:CPU from
    recomputing the earlier blocks of a stage in every later block's forward (docs/benchmarks-history.md).
    """
    return _batch_norm_fwd(x, scale, bias, residual, epsilon, relu, axis_name, use_native, platform)[0]


def _batch_norm_fwd(x, scale, bias, residual, epsilon, relu, axis_name, use_native=False, platform="cpu"):
    mean, var, count = batch_moments(x, axis_name, use_native, platform)
    inv = lax.rsqrt(var + epsilon)
    if use_native and residual is not None and epilogue_applies(x, x.dtype, platform, residual):
        y = cpu.affine_add_relu(x, mean, scale * inv, bias, residual, relu=relu)
    else:
        y = (x.astype(jnp.float32) - mean) * (scale * inv) + bias
        y = add_act(y, None if residual is None else residual.astype(jnp.float32), jax.nn.relu if relu else None)
        y = y.astype(x.dtype)
    return (y, mean, var), (x, scale, mean, inv, count, y if relu else None, residual is not None)


def _batch_norm_bwd(epsilon, relu, axis_name, use_native, platform, saved, cotangents):
    x, scale, mean, inv, count, y, has_residual = saved
    dy = cotangents[0].astype(jnp.float32)
    dz = jnp.where(y > 0, dy, 0.0) if relu else dy
    axes = tuple(range(x.ndim - 1))
    xhat = (x.astype(jnp.float32) - mean) * inv
    if _native_sums_apply(x, use_native, platform):
        dbias, centred = cpu.channel_sums(dy, x, mean, y if relu else None)
        dscale = centred * inv
    else:
        dbias, dscale = jnp.sum(dz, axes), jnp.sum(dz * xhat, axes)
    # The statistics are shared across the axis, so their gradient terms are summed over it; the parameter
    # gradients stay per-device (the train step averages them), as with autodiff under pmap semantics.
    total_dbias, total_dscale = (dbias, dscale) if axis_name is None else lax.psum((dbias, dscale), axis_name)
    dx = (scale * inv) * (dz - total_dbias / count - xhat * (total_dscale / count))
    dresidual = dz.astype(x.dtype) if has_residual else None
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype), dresidual


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
