"""2-D convolution with selectable implementations for grouped kernels.

Every implementation takes the same arguments and the same kernel layout as
`flax.linen.Conv(feature_group_count=groups)`: activations NHWC, kernel
`(kh, kw, in_channels // groups, out_channels)`, so weights never change when the
implementation does. Input channel `c` belongs to group `c // (C // groups)` and output
channel `o` to group `o // (O // groups)`, as in torch and XLA.

XLA's own grouped convolution (`feature_group_count`) is very slow on CPU, especially its
backward pass (docs/benchmarks-history.md), hence the choice. Implementations:

- `xla`: `lax.conv_general_dilated(feature_group_count=groups)`.
- `split`: one dense conv per group, concatenated.
- `blockdiag`: the grouped kernel expanded into a block-diagonal dense kernel; one dense
  conv, `groups`x the FLOPs.
- `chunked`: groups merged into a few chunks, each a block-diagonal dense conv: fewer,
  larger convs than `split` at a bounded FLOP overhead (`chunks` of them).
- `gemm`: im2col (the kernel taps' shifted views, concatenated on channels; nothing for a
  1x1 kernel) and one matmul per group. Autodiff turns it into matmuls too, which XLA:CPU runs
  at GEMM speed, while its own convolution backward runs far below it.
- `native`: C++ AVX-512 or AVX2 kernels through `jax.ffi` (`resnext_jax.cpu`, built on first use with
  the system's C++ compiler) for the forward pass, the input gradient and the kernel gradient, no FLOPs spent
  on zeros. CPU only, float32, as many output as input channels per group, and 1, 2 or 4 channels per
  group with channels a multiple of 16, or any multiple of 8 channels per group (dense convs included);
  other convs run as `split`. Forward-only dense convs with at most 4 input channels (the stems) run by
  `cpu.few_channel_conv` under `auto` or `native` (see `resolve_impl`).
- `auto`: the measured fastest for the backend and the shape (see `resolve_impl`).

All but `native` are plain JAX, so gradients come from autodiff; all match the float64
reference (tests/test_grouped_conv.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax import cpu

CONV_IMPLS = ("auto", "xla", "split", "blockdiag", "chunked", "gemm", "native")

Padding = Sequence[tuple[int, int]]


def _xla(x, kernel, strides, padding, groups, precision):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=precision,
    )


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
    outs = [_blockdiag(xi, ki, strides, padding, groups // chunks, precision) for xi, ki in zip(xs, ks)]
    return outs[0] if chunks == 1 else jnp.concatenate(outs, axis=-1)


def im2col(x: jax.Array, kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding) -> jax.Array:
    """`(N, H, W, C)` -> `(N, H', W', kh * kw * C)`: the input under each kernel tap, taps outermost.

    The channel order matches an HWIO kernel reshaped to `(kh * kw * C, O)`.
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    n, h, w, _ = x.shape
    ho = (h + padding[0][0] + padding[0][1] - kh) // sh + 1
    wo = (w + padding[1][0] + padding[1][1] - kw) // sw + 1
    if any(map(any, padding)):
        x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    taps = [x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _gemm(x, kernel, strides, padding, groups, precision):
    """im2col and one 2-D matmul per group; autodiff's backward is matmuls (plus pads) as well."""
    kh, kw, cin_g, out = kernel.shape
    out_g = out // groups
    outs = []
    for xg, kg in zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1)):
        cols = im2col(xg, (kh, kw), strides, padding)
        y = jnp.dot(cols.reshape(-1, kh * kw * cin_g), kg.reshape(kh * kw * cin_g, out_g), precision=precision)
        outs.append(y.reshape(*cols.shape[:3], out_g))
    return outs[0] if groups == 1 else jnp.concatenate(outs, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _native(x, kernel, strides, padding, groups, precision):
    """The native kernel's forward; its VJP is the native input and kernel gradients."""
    return cpu.grouped_conv_forward(x, kernel, strides, padding)


def _native_fwd(x, kernel, strides, padding, groups, precision):
    return _native(x, kernel, strides, padding, groups, precision), (x, kernel)


def kernel_grad_by_taps(x, dy, kernel_hw, strides, padding):
    """Kernel gradient of a dense conv as one `(C, N*H'*W') @ (N*H'*W', O)` matmul per kernel tap.

    XLA:CPU runs the equivalent convolution (batch and features swapped) far below matmul speed when the
    batch is small and the feature map large (56x56, 28x28); at 14x14 and below the convolution is as fast or
    faster.
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    _, ho, wo, out = dy.shape
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    dy2 = dy.reshape(-1, out)
    taps = [
        jnp.dot(
            xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw].reshape(-1, x.shape[-1]).T,
            dy2,
            preferred_element_type=jnp.float32,
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps).reshape(kh, kw, x.shape[-1], out)


def native_kernel_grad_by_taps(kernel_shape, strides, dy_hw) -> bool:
    """Whether the native conv's kernel gradient is better taken as matmuls (`kernel_grad_by_taps`): with the
    AVX2 build, for dense convs that are strided or have at most 14x14 outputs, where the matmuls measured
    faster than the AVX2 kernel; the larger stride-1 ones stay native. The AVX-512 build keeps its own kernel
    gradient everywhere (docs/benchmarks-history.md has the per-shape timings).
    """
    kh, kw, cin_g, out = kernel_shape
    return (
        cpu.isa() == "avx2"
        and cin_g == out
        and (kh, kw) != (1, 1)
        and (max(strides) > 1 or dy_hw[0] * dy_hw[1] <= 14 * 14)
    )


def native_vjp(strides, padding, residuals, dy):
    """(dx, dkernel) of the native grouped conv: by the native kernels, or the kernel gradient by matmuls
    where `native_kernel_grad_by_taps` says so."""
    x, kernel = residuals
    dx = cpu.grouped_conv_input_grad(dy, kernel, x.shape[1:3], strides, padding)
    if native_kernel_grad_by_taps(kernel.shape, strides, dy.shape[1:3]):
        return dx, kernel_grad_by_taps(x, dy, kernel.shape[:2], strides, padding).astype(kernel.dtype)
    return dx, cpu.grouped_conv_kernel_grad(x, dy, kernel.shape, strides, padding)


def _native_bwd(strides, padding, groups, precision, residuals, dy):
    return native_vjp(strides, padding, residuals, dy)


_native.defvjp(_native_fwd, _native_bwd)


# For a forward-only conv, 'auto' merges groups of at most _NARROW_GROUP channels into block-diagonal
# chunks of _GROUPS_PER_CHUNK groups (see resolve_impl).
_NARROW_GROUP = 8
_GROUPS_PER_CHUNK = 4

_IMPL_FNS = {
    "xla": _xla,
    "split": _split,
    "blockdiag": _blockdiag,
    "chunked": _chunked,
    "gemm": _gemm,
    "native": _native,
}


def resolve_impl(
    impl: str,
    groups: int,
    kernel_hw: Sequence[int] = (3, 3),
    channels: int | None = None,
    forward_only: bool = False,
    native_shape: bool = False,
    platform: str | None = None,
) -> str:
    """Maps 'auto' to a concrete implementation for `platform` (default: JAX's default backend) and the conv's
    shape.

    CPU (docs/benchmarks-history.md has the measurements):
    Each rule is the measured fastest; the measurements are in docs/benchmarks-history.md ("Measurements
    behind the code's choices").
    CPU:
    - grouped, or dense and not 1x1, where the native kernels support the conv (`native_shape`: see
      `cpu.supports`) and could be built here (`cpu.available()`): 'native', no FLOPs spent on zeros and
      gradients far faster than any pure-XLA backward;
    - grouped: 'split', the fastest forward+backward on every ResNeXt-50 grouped shape; but when only
      the forward runs through this op (`forward_only`: a custom VJP such as
      `ops.conv_grad.conv2d_canonical_grad` computes the backward, or there is none) and groups are
      at most `_NARROW_GROUP` channels wide, 'chunked' with `_GROUPS_PER_CHUNK` groups per chunk (a faster
      forward with fewer ops to compile, where its autodiff backward would be slower than 'split's);
    - dense 1x1: 'gemm', a single matmul, several times faster than XLA:CPU's convolution forward+backward;
    - other dense kernels the native kernels do not take: 'xla' (im2col's 9x copy costs what the
      matmul saves); but `conv2d(forward_only=True)` runs a dense conv with at most
      `cpu.FEW_CHANNELS` input channels and a multiple of 16 outputs (the stems) by
      `cpu.few_channel_conv` where the kernels run.
    GPU/TPU: 'xla', whose grouped conv is a native cuDNN/TPU op, the fastest or tied on an H100 on nearly
    every ResNeXt-50 shape ('split' and 'gemm' are several times slower); a GPU rule for the narrow groups where
    'blockdiag' wins (the slow cuDNN backward of jax#13800) waits on a whole-model measurement.

    An explicit grouped implementation on a dense conv (`groups == 1`) is plain 'xla': they
    all compute the same single convolution. 'gemm' and 'native' are honoured for any conv. An explicit
    'native' on a conv the kernels do not support runs as 'split' ('xla' when dense); where they cannot
    be built it raises.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl {impl!r} is not one of {CONV_IMPLS}")
    on_cpu = (platform or jax.default_backend()) == "cpu"
    if impl == "auto":
        if not on_cpu:
            return "xla"
        if native_shape and (groups > 1 or tuple(kernel_hw) != (1, 1)) and cpu.available():
            return "native"
        if groups > 1:
            narrow = channels is not None and channels // groups <= _NARROW_GROUP
            return "chunked" if forward_only and narrow else "split"
        return "gemm" if tuple(kernel_hw) == (1, 1) else "xla"
    if groups == 1 and impl not in ("gemm", "native"):
        return "xla"
    if impl == "native":
        if not on_cpu or not cpu.available():
            raise ValueError(
                f"conv impl 'native' is unavailable: "
                f"{'it is a CPU kernel' if not on_cpu else cpu.unavailable_reason()}; "
                f"use impl='auto', which picks the fastest available implementation"
            )
        if not native_shape:
            return "split" if groups > 1 else "xla"
    return impl


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    groups: int = 1,
    impl: str = "auto",
    precision=None,
    forward_only: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Convolves NHWC `x` with an HWIO `kernel` of shape (kh, kw, C // groups, O).

    Args:
      x: input, `(N, H, W, C)`.
      kernel: `(kh, kw, C // groups, O)`, Flax's `feature_group_count` layout.
      strides: `(sh, sw)`.
      padding: explicit `((top, bottom), (left, right))`.
      groups: number of channel groups; `C` and `O` must both divide by it.
      impl: one of `CONV_IMPLS`.
      precision: passed to the underlying `lax` conv or dot.
      forward_only: the caller computes the backward pass itself (or needs none); lets `auto` pick the
        fastest forward even where its autodiff backward would be slow (see `resolve_impl`).
      platform: the backend it runs on ('cpu', 'gpu', 'tpu'); default: JAX's default backend.
    Returns:
      `(N, H', W', O)`.
    """
    channels = x.shape[-1]
    if groups < 1 or channels % groups or kernel.shape[-1] % groups or kernel.shape[2] * groups != channels:
        raise ValueError(
            f"conv with groups={groups}: input has {channels} channels and kernel shape "
            f"{tuple(kernel.shape)}; need groups >= 1 dividing both, and kernel "
            f"(kh, kw, {channels // groups if groups >= 1 else '?'}, O) with O % groups == 0"
        )
    requested, platform = impl, platform or jax.default_backend()
    impl = resolve_impl(
        impl,
        groups,
        kernel.shape[:2],
        channels,
        forward_only,
        cpu.supports(x.shape, kernel.shape, x.dtype, groups) and kernel.dtype == x.dtype,
        platform,
    )
    if (
        impl == "xla"
        and requested in ("auto", "native")
        and forward_only
        and kernel.dtype == x.dtype
        and cpu.supports_few_channels(x.shape, kernel.shape, x.dtype, groups)
        and cpu.runs_on(platform, x)
    ):
        # The stems' 3-channel conv by the native kernel (no VJP of its own: forward_only callers have theirs).
        return cpu.few_channel_conv(x, kernel, tuple(strides), tuple(map(tuple, padding)))
    fn = _IMPL_FNS[impl]
    if impl == "chunked" and requested == "auto":
        fn = functools.partial(_chunked, chunks=max(1, groups // _GROUPS_PER_CHUNK))
    return fn(x, kernel, tuple(strides), tuple(map(tuple, padding)), groups, precision)
