"""2-D convolution with selectable implementations for grouped kernels.

Every implementation takes the same arguments and the same kernel layout as
`flax.linen.Conv(feature_group_count=groups)`: activations NHWC, kernel
`(kh, kw, in_channels // groups, out_channels)`, so weights never change when the
implementation does. Input channel `c` belongs to group `c // (C // groups)` and output
channel `o` to group `o // (O // groups)`, as in torch and XLA.

XLA's own grouped convolution (`feature_group_count`) is pathologically slow on
CPU, especially its backward pass (see ../shared/REFERENCE.md and docs/benchmarks.md),
hence the choice. Implementations:

- `xla`: `lax.conv_general_dilated(feature_group_count=groups)`.
- `split`: one dense conv per group, concatenated.
- `blockdiag`: the grouped kernel expanded into a block-diagonal dense kernel; one dense
  conv, `groups`x the FLOPs.
- `chunked`: groups merged into a few chunks, each a block-diagonal dense conv: fewer,
  larger convs than `split` at a bounded FLOP overhead (`chunks` of them).
- `auto`: the measured fastest for the backend (see `resolve_impl`).

All are plain JAX, so gradients come from autodiff and match the float64 reference
(tests/test_grouped_conv.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "split", "blockdiag", "chunked")

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


def block_diagonal_kernel(kernel: jax.Array, groups: int) -> jax.Array:
    """Expands a `(kh, kw, C // groups, O)` grouped kernel into a dense `(kh, kw, C, O)` one.

    Off-diagonal blocks are zero, so a dense conv with it equals the grouped conv; the
    gradient with respect to the compact kernel follows from autodiff of this expansion.
    """
    kh, kw, cin_g, out = kernel.shape
    out_g = out // groups
    blocks = kernel.reshape(kh, kw, cin_g, groups, out_g)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    dense = jnp.einsum("hwcgo,gq->hwgcqo", blocks, eye)
    return dense.reshape(kh, kw, groups * cin_g, out)


def _blockdiag(x, kernel, strides, padding, groups, precision):
    return _xla(x, block_diagonal_kernel(kernel, groups), strides, padding, 1, precision)


def _chunked(x, kernel, strides, padding, groups, precision, chunks=4):
    """Groups merged into `chunks` block-diagonal dense convs (chunks x less waste than blockdiag)."""
    chunks = min(chunks, groups)
    while groups % chunks:
        chunks -= 1
    xs = jnp.split(x, chunks, axis=-1)
    ks = jnp.split(kernel, chunks, axis=-1)
    outs = [_blockdiag(xi, ki, strides, padding, groups // chunks, precision)
            for xi, ki in zip(xs, ks)]
    return outs[0] if chunks == 1 else jnp.concatenate(outs, axis=-1)


_IMPL_FNS = {"xla": _xla, "split": _split, "blockdiag": _blockdiag, "chunked": _chunked}


def resolve_impl(impl: str, groups: int) -> str:
    """Maps 'auto' to a concrete implementation for the current default backend.

    CPU: 'split' (measured fastest forward+backward on every ResNeXt-50 grouped shape; see
    docs/benchmarks.md). GPU/TPU: 'xla', whose grouped conv is a native cuDNN/TPU op; the
    slow GPU backward of jax#13800 is still no worse than a dense conv, while 'split'
    launches `groups` small kernels per conv.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl {impl!r} is not one of {CONV_IMPLS}")
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
      precision: passed to the underlying `lax` conv or dot.
    Returns:
      `(N, H', W', O)`.
    """
    channels = x.shape[-1]
    if (groups < 1 or channels % groups or kernel.shape[-1] % groups
            or kernel.shape[2] * groups != channels):
        raise ValueError(
            f"conv with groups={groups}: input has {channels} channels and kernel shape "
            f"{tuple(kernel.shape)}; need groups >= 1 dividing both, and kernel "
            f"(kh, kw, {channels // groups if groups >= 1 else '?'}, O) with O % groups == 0")
    impl = resolve_impl(impl, groups)
    fn = _IMPL_FNS[impl]
    return fn(x, kernel, tuple(strides), tuple(map(tuple, padding)), groups, precision)
