"""2-D convolution with selectable implementations for grouped kernels.

Every implementation takes the same arguments and the same kernel layout as
`flax.linen.Conv(feature_group_count=groups)`: activations NHWC, kernel
`(kh, kw, in_channels // groups, out_channels)`, so weights never change when the
implementation does.

XLA's own grouped convolution (`feature_group_count`) is pathologically slow on
CPU, especially its backward pass (see ../shared/REFERENCE.md), hence the choice.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "split")

Padding = Sequence[tuple[int, int]]


def _xla(x, kernel, strides, padding, groups, precision):
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, precision=precision)


def _split(x, kernel, strides, padding, groups, precision):
    """One dense conv per group, concatenated: same math, fast dense kernels."""
    xs = jnp.split(x, groups, axis=-1)
    ks = jnp.split(kernel, groups, axis=-1)
    outs = [_xla(xi, ki, strides, padding, 1, precision) for xi, ki in zip(xs, ks)]
    return jnp.concatenate(outs, axis=-1)


def resolve_impl(impl: str, groups: int) -> str:
    """Maps 'auto' to a concrete implementation for the current default backend."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}")
    if groups == 1:
        return "xla"
    if impl == "auto":
        return "split" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0)), groups: int = 1, impl: str = "auto",
           precision=None) -> jax.Array:
    """Convolves NHWC `x` with an HWIO `kernel` of shape (kh, kw, C // groups, O).

    Args:
      x: input, `(N, H, W, C)`.
      kernel: `(kh, kw, C // groups, O)`, Flax's `feature_group_count` layout.
      strides: `(sh, sw)`.
      padding: explicit `((top, bottom), (left, right))`.
      groups: number of channel groups; `C` and `O` must both divide by it.
      impl: one of `CONV_IMPLS`.
    Returns:
      `(N, H', W', O)`.
    """
    channels = x.shape[-1]
    if channels % groups or kernel.shape[-1] % groups or kernel.shape[2] * groups != channels:
        raise ValueError(
            f"conv with groups={groups}: input has {channels} channels and kernel shape "
            f"{kernel.shape}; need kernel (kh, kw, {channels // max(groups, 1)}, O) with O % groups == 0")
    impl = resolve_impl(impl, groups)
    fn = {"xla": _xla, "split": _split}[impl]
    return fn(x, kernel, tuple(strides), tuple(map(tuple, padding)), groups, precision)
