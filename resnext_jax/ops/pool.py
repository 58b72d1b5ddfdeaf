"""Pooling: the stems' 3x3/2 max pool (with the native gradient on CPU) and the global average pool."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax import cpu


def max_pool_3x3s2(x: jax.Array, differentiable: bool, platform: str) -> jax.Array:
    """3x3 max pool, stride 2, padding 1 with -inf (torch's `MaxPool2d(3, 2, 1)`).

    The forward pools each spatial axis in turn as the max of its even elements, its odd elements and the
    odd ones shifted by one (`-inf` in front): strided slices that XLA:CPU fuses with the stem's batch norm
    and ReLU, with no padded copy of the 8 x 112 x 112 x 64 input. Faster than the max of 9 slices of a padded copy,
    and than `reduce_window` after a separate batch-norm pass (docs/benchmarks-history.md). The gradient goes to
    the first maximum of each window, as torch's does: where a gradient is wanted (`differentiable`), on a CPU with the
    native kernels by `cpu.max_pool_grad` (one pass, where XLA:CPU's select-and-scatter is slow), elsewhere
    (other backends, bfloat16) by `lax.reduce_window`'s autodiff.
    """
    if differentiable:
        if cpu.eligible("max_pool_grad", platform, x, shape_ok=x.shape[-1] % 8 == 0):
            return _max_pool_3x3s2(x)
        return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    return _max_pool_3x3s2_forward(x)


def _max_pool_3x3s2_forward(x: jax.Array) -> jax.Array:
    def pool(x, axis):  # output i = max(x[2i - 1], x[2i], x[2i + 1]) along `axis`
        n = x.shape[axis]
        even, odd = lax.slice_in_dim(x, 0, n, 2, axis=axis), lax.slice_in_dim(x, 1, n, 2, axis=axis)
        fill = jnp.full_like(lax.slice_in_dim(even, 0, 1, axis=axis), -jnp.inf)
        before = jnp.concatenate([fill, lax.slice_in_dim(odd, 0, even.shape[axis] - 1, axis=axis)], axis)
        if odd.shape[axis] < even.shape[axis]:  # odd length: the last window has no x[2i + 1]
            odd = jnp.concatenate([odd, fill], axis)
        return jnp.maximum(jnp.maximum(even, odd), before)

    return pool(pool(x, 1), 2)


@jax.custom_vjp
def _max_pool_3x3s2(x: jax.Array) -> jax.Array:
    """The stem pool with its gradient by `cpu.max_pool_grad` (float32, channels a multiple of 8, CPU)."""
    return _max_pool_3x3s2_forward(x)


def _max_pool_3x3s2_fwd(x):
    return _max_pool_3x3s2_forward(x), x


def _max_pool_3x3s2_bwd(x, dy):
    return (cpu.max_pool_grad(x, dy, (3, 3), (2, 2), (1, 1)),)


_max_pool_3x3s2.defvjp(_max_pool_3x3s2_fwd, _max_pool_3x3s2_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C), averaged in float32.

    A contraction with `1 / (H W)`, not a reduce: XLA:CPU (jax 0.10.2) drops NaN from a reduction into which
    the last block's ReLU (a max) is fused, which returned finite logits for an image with one NaN pixel and
    blinded the non-finite-loss guard (tests/test_nonfinite.py).
    """
    h, w = x.shape[1:3]
    weights = jnp.full((h, w), 1.0 / (h * w), jnp.float32)
    return jnp.einsum("nhwc,hw->nc", x.astype(jnp.float32), weights, precision=lax.Precision.HIGHEST)


def avg_pool_2x2_ceil(x: jax.Array, stride: int) -> jax.Array:
    """2x2 average pool with `stride` over NHWC `x`, torch's `AvgPool2d(2, stride, ceil_mode=True,
    count_include_pad=False)`: windows that run past the bottom or right edge average the pixels they cover (the
    ResNet-D shortcut)."""
    if stride == 1:
        return x
    h, w = x.shape[1:3]
    pads = (
        (0, 0),
        (0, max(0, (-(-(h - 2) // stride)) * stride + 2 - h)),
        (0, max(0, (-(-(w - 2) // stride)) * stride + 2 - w)),
        (0, 0),
    )
    window, strides = (1, 2, 2, 1), (1, stride, stride, 1)
    sums = lax.reduce_window(x.astype(jnp.float32), 0.0, lax.add, window, strides, pads)
    ones = jnp.ones((1, h, w, 1), jnp.float32)
    counts = lax.reduce_window(ones, 0.0, lax.add, window, strides, pads)
    return (sums / counts).astype(x.dtype)
