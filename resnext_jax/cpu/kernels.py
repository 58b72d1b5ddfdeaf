"""The native CPU kernels' entry points: each an XLA FFI call with the shape and dtype conditions it needs.

XLA:CPU has no fast grouped convolution, and runs a few memory-bound passes of a ResNet's step far below the
memory's speed; these kernels do that work instead (docs/benchmarks-history.md has the measurements):

- `grouped_conv_forward`, `grouped_conv_input_grad`, `grouped_conv_kernel_grad`: a grouped (or dense 3x3)
  conv's forward and both gradients with AVX-512 or AVX2 FMAs, no FLOPs spent on zeros;
- `few_channel_conv`, `few_channel_kernel_grad`: the stems' 3-channel conv forward and kernel gradient;
- `affine_add_relu`: a residual block's batch norm, shortcut add and ReLU in one pass;
- `matmul_affine`: a 1x1 conv with its batch norm (and shortcut and ReLU) as the matmul's epilogue;
- `channel_sums`: batch norm's per-channel training sums;
- `max_pool_grad`: the stem max pool's gradient.

Callers (`resnext_jax.ops`) ask `resnext_jax.cpu.eligible` first; every kernel here has a pure-XLA equivalent
there. Each call records its kernel in `USED` at trace time, for the reports.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.cpu.build import (
    EPILOGUE_TARGET,
    FEW_CHANNEL_CONV_TARGET,
    FEW_CHANNEL_GRAD_TARGET,
    GRAD_TARGET,
    MATMUL_TARGET,
    POOL_GRAD_TARGET,
    SUMS_TARGET,
    TARGET,
    isa,
)
from resnext_jax.cpu.build import _target as _registered

# Kernels traced into a computation in this process (kernel name, as in this module's functions).
USED: set[str] = set()
_NAMES = {
    TARGET: "grouped_conv_forward",
    GRAD_TARGET: "grouped_conv_kernel_grad",
    EPILOGUE_TARGET: "affine_add_relu",
    SUMS_TARGET: "channel_sums",
    POOL_GRAD_TARGET: "max_pool_grad",
    FEW_CHANNEL_GRAD_TARGET: "few_channel_kernel_grad",
    FEW_CHANNEL_CONV_TARGET: "few_channel_conv",
    MATMUL_TARGET: "matmul_affine",
}


def _target(name: str) -> str:
    USED.add(_NAMES[name])
    return _registered(name)


# channels a multiple of 16; wider groups need a multiple of 8 channels.
NARROW_GROUP_WIDTHS = (1, 2, 4)


def supports(x_shape, kernel_shape, dtype, groups: int) -> bool:
    """Whether the kernels handle this conv: float32, NHWC/HWIO, as many output as input channels per
    group, and a multiple of 8 channels per group (dense convs included: one group of all the channels) or
    `NARROW_GROUP_WIDTHS` channels per group and channels a multiple of 16."""
    channels, (_, _, cin_g, out) = x_shape[-1], kernel_shape
    return (
        jnp.dtype(dtype) == jnp.float32
        and len(x_shape) == 4
        and out == channels
        and cin_g * groups == channels
        and (cin_g % 8 == 0 or (cin_g in NARROW_GROUP_WIDTHS and channels % 16 == 0))
    )


def grouped_conv_forward(
    x: jax.Array, kernel: jax.Array, strides, padding, input_dilation=(1, 1), transpose_kernel: bool = False
) -> jax.Array:
    """The grouped conv `(N, H, W, C) * (kh, kw, C/G, C) -> (N, H', W', C)` by the native kernel (no VJP).

    `input_dilation` `(dh, dw)` puts `d - 1` zeros between input rows and columns without computing on
    them (`lax.conv_general_dilated`'s `lhs_dilation`; `dw > 1` needs a column stride of 1): a strided
    conv's input gradient. Padding may be negative. `transpose_kernel` uses the kernel flipped and
    transposed within groups (input and output channels swapped): an input gradient's kernel.
    """
    n, h, w, _ = x.shape
    kh, kw, _, out = kernel.shape
    (sh, sw), ((pt, pb), (pl, pr)), (dh, dw) = strides, padding, input_dilation
    ho, wo = ((h - 1) * dh + 1 + pt + pb - kh) // sh + 1, ((w - 1) * dw + 1 + pl + pr - kw) // sw + 1
    call = jax.ffi.ffi_call(
        _target(TARGET), jax.ShapeDtypeStruct((n, ho, wo, out), jnp.float32), vmap_method="sequential"
    )
    return call(
        x,
        kernel,
        sh=np.int64(sh),
        sw=np.int64(sw),
        ph=np.int64(pt),
        pw=np.int64(pl),
        dh=np.int64(dh),
        dw=np.int64(dw),
        transpose=np.int64(transpose_kernel),
    )


def grouped_conv_input_grad(dy: jax.Array, kernel: jax.Array, x_hw, strides, padding) -> jax.Array:
    """The input gradient of `grouped_conv_forward(x, kernel, strides, padding)` for output gradient `dy`.

    It is the grouped conv of `dy`, dilated by the stride, with the kernel flipped and, within each group,
    transposed (input and output channels swapped), padded by `k - 1 - pad` below and what makes the
    result `x_hw` above.
    """
    pads = input_grad_padding(x_hw, kernel.shape[:2], strides, padding, dy.shape[1:3])
    return grouped_conv_forward(dy, kernel, (1, 1), pads, input_dilation=strides, transpose_kernel=True)


def input_grad_padding(x_hw, kernel_hw, strides, padding, dy_hw) -> list[tuple[int, int]]:
    """Per-axis `(low, high)` padding of the stride-dilated `dy` whose conv with the flipped kernel is a conv's
    input gradient: `k - 1 - pad` below, and above what makes the result `x_hw` (negative crops)."""
    return [
        (k - 1 - low, size - (out_size - 1) * stride - 1 + low)
        for size, k, stride, (low, _), out_size in zip(x_hw, kernel_hw, strides, padding, dy_hw)
    ]


def grouped_conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape, strides, padding) -> jax.Array:
    """The kernel gradient `(kh, kw, C/G, C)` of `grouped_conv_forward(x, kernel, strides, padding)` for
    output gradient `dy`."""
    call = jax.ffi.ffi_call(
        _target(GRAD_TARGET), jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32), vmap_method="sequential"
    )
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return call(x, dy, sh=np.int64(sh), sw=np.int64(sw), ph=np.int64(pt), pw=np.int64(pl))


def affine_add_relu(
    y: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    residual: jax.Array,
    residual_affine: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    relu: bool = True,
) -> jax.Array:
    """`relu((y - mean) * scale + shift + residual')` by the native kernel, where `residual'` is `residual`,
    or `(residual - m) * s + b` for `residual_affine=(m, s, b)`.

    float32, channels last; the vectors have one entry per channel. A residual block's inference epilogue:
    its last batch norm with running statistics (`scale = gamma / sqrt(var + eps)`), the shortcut (or its
    batch norm), the add and the ReLU, in one pass whose result XLA reads but does not recompute
    (docs/benchmarks-history.md). Differentiable: the backward pass is the autodiff of the same
    formula in JAX (for gradients through an inference-mode model, e.g. saliency maps).
    """
    if residual_affine is None:
        zeros = jnp.zeros(y.shape[-1:], jnp.float32)
        residual_affine = (zeros, jnp.ones_like(zeros), zeros)
    return _affine_add_relu(bool(relu), y, mean, scale, shift, residual, *residual_affine)


def channel_sums(
    a: jax.Array, b: jax.Array, shift: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-channel `(sum(a'), sum(a' * (b - shift)))` over all but the last axis by the native kernel, where
    `a'` is `a`, or `where(mask > 0, a, 0)`. float32, channels last; `b` (and `mask`) of `a`'s shape, `shift`
    one entry per channel. No VJP: training-mode batch norm's statistics, `(x, x, 0)` for sum x and sum x^2,
    and its backward's, `(dy, x, mean, mask=y)` for sum dz and sum dz (x - mean) (one pass where XLA:CPU's
    reductions ran at 6-15 GB/s; docs/benchmarks-history.md). The sums are in float32 over runs of
    rows and in float64 across them, in an order fixed by the shape.
    """
    channels = a.shape[-1]
    out = jax.ShapeDtypeStruct((channels,), jnp.float32)
    call = jax.ffi.ffi_call(_target(SUMS_TARGET), (out, out), vmap_method="sequential")
    return call(a, b, shift, a if mask is None else mask, masked=np.int64(mask is not None))


def few_channel_kernel_grad(xs: jax.Array, dy: jax.Array, taps) -> jax.Array:
    """`dw[p, q, i, o] = sum_{n,y,x} xs[n, y + p, x + q, i] dy[n, y, x, o]` by the native kernel: the kernel
    gradient `(th, tw, C, O)` of a stride-1 unpadded dense conv with `taps = (th, tw)`, for `xs`
    `(N, H, W, C)` and `dy` `(N, H - th + 1, W - tw + 1, O)`, float32, O a multiple of 32. Meant for few input
    channels (the stem after space-to-depth, `ops.conv_grad`): each tap is read
    in place, where XLA ops slice the input once per tap (docs/benchmarks-history.md).
    """
    th, tw = taps
    out = jax.ShapeDtypeStruct((th, tw, xs.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(_target(FEW_CHANNEL_GRAD_TARGET), out, vmap_method="sequential")(xs, dy)


# At most this many input channels for `few_channel_conv` (the stems' 3; wider convs have `grouped_conv_forward`).
FEW_CHANNELS = 4


def supports_few_channels(x_shape, kernel_shape, dtype, groups: int) -> bool:
    """Whether `few_channel_conv` takes this conv: float32, dense, at most `FEW_CHANNELS` input channels, a
    multiple of 16 output channels."""
    return (
        jnp.dtype(dtype) == jnp.float32
        and len(x_shape) == 4
        and groups == 1
        and x_shape[-1] == kernel_shape[2] <= FEW_CHANNELS
        and kernel_shape[-1] % 16 == 0
    )


def few_channel_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """The dense conv `(N, H, W, C) * (kh, kw, C, O) -> (N, H', W', O)` with `padding` `((top, bottom),
    (left, right))` (negative crops) by the native kernel (no VJP), for few input channels (the stems'
    3, `supports_few_channels`): the input is padded here, then each output pixel's `kw * C` inputs per kernel
    row are read in place as one matmul row. The ResNet stem's 7x7/2 conv runs at about twice
    XLA:CPU's speed (docs/benchmarks-history.md).
    """
    (pt, pb), (pl, pr) = padding
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    (sh, sw), (kh, kw, _, out) = strides, kernel.shape
    n, hp, wp, _ = xp.shape
    shape = jax.ShapeDtypeStruct((n, (hp - kh) // sh + 1, (wp - kw) // sw + 1, out), jnp.float32)
    call = jax.ffi.ffi_call(_target(FEW_CHANNEL_CONV_TARGET), shape, vmap_method="sequential")
    return call(xp, kernel, sh=np.int64(sh), sw=np.int64(sw))


# `matmul_affine`'s output columns: register blocks of 16, the last one 8 wide where N = 16m + 8 (RegNet's
# 120- and 888-channel convs).
MATMUL_COLUMNS = 8


# The builds whose `matmul_affine` the models use: its register blocks are 8-lane AVX2 code in every build, so
# on an AVX-512 CPU (16 lanes) XLA's own matmul is left the 1x1 convs.
MATMUL_ISAS = ("avx2",)


def matmul_preferred() -> bool:
    """Whether the models run their inference 1x1 convs through `matmul_affine` here: the kernels built for
    one of `MATMUL_ISAS`."""
    return isa() in MATMUL_ISAS


def supports_matmul(a_shape, b_shape, dtype) -> bool:
    """Whether `matmul_affine` takes `a @ b`: float32, 2-D, the columns a multiple of `MATMUL_COLUMNS`."""
    return (
        jnp.dtype(dtype) == jnp.float32
        and len(a_shape) == len(b_shape) == 2
        and a_shape[1] == b_shape[0]
        and b_shape[1] % MATMUL_COLUMNS == 0
    )


def matmul_affine(
    a: jax.Array,
    b: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    residual: jax.Array | None = None,
    relu: bool = False,
    prologue: tuple[jax.Array, jax.Array] | None = None,
    prologue_relu: bool = False,
) -> jax.Array:
    """`act(a' @ b * scale + shift (+ residual))` by the native kernel, `act` ReLU or none, where `a'` is `a`, or
    `act'(a * s + h)` for `prologue=(s, h)` with `act'` ReLU if `prologue_relu`: `a` `(M, K)`, `b` `(K, N)`
    (`supports_matmul`), `scale` and `shift` `(N,)`, `residual` `(M, N)`, `s` and `h` `(K,)`; float32.

    Inference's 1x1 conv with the batch norm after it (and a residual block's shortcut and ReLU) applied to each
    register block before it is stored, and the batch norm and ReLU before it applied to each 6 rows of `a` as
    they are read, where XLA:CPU writes the matmul's output and reads it back once or twice and normalizes
    the input in a pass of its own (docs/benchmarks-history.md). Differentiable: the backward pass is
    the autodiff of the same formula in JAX.
    """
    dummy = jnp.zeros((1,), jnp.float32)
    a_scale, a_shift = prologue if prologue is not None else (dummy, dummy)
    return _matmul_affine(
        bool(relu),
        residual is not None,
        prologue is not None,
        bool(prologue_relu),
        a,
        b,
        scale,
        shift,
        dummy if residual is None else residual,
        a_scale,
        a_shift,
    )


def _matmul_affine_reference(
    relu, with_residual, prologue, prologue_relu, a, b, scale, shift, residual, a_scale, a_shift
):
    if prologue:
        a = a * a_scale + a_shift
        a = jnp.maximum(a, 0.0) if prologue_relu else a
    out = jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST) * scale + shift
    if with_residual:
        out = out + residual
    return jnp.maximum(out, 0.0) if relu else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matmul_affine(relu, with_residual, prologue, prologue_relu, a, b, *args):
    call = jax.ffi.ffi_call(
        _target(MATMUL_TARGET), jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32), vmap_method="sequential"
    )
    return call(
        a,
        b,
        *args,
        relu=np.int64(relu),
        with_residual=np.int64(with_residual),
        prologue=np.int64(prologue),
        prologue_relu=np.int64(prologue_relu),
    )


def _matmul_affine_fwd(*args):
    return _matmul_affine(*args), args[4:]


def _matmul_affine_bwd(relu, with_residual, prologue, prologue_relu, args, g):
    reference = functools.partial(_matmul_affine_reference, relu, with_residual, prologue, prologue_relu)
    return jax.vjp(reference, *args)[1](g)


_matmul_affine.defvjp(_matmul_affine_fwd, _matmul_affine_bwd)


def max_pool_grad(x: jax.Array, dy: jax.Array, window, strides, padding) -> jax.Array:
    """The input gradient of a max pool of `x` (`(N, H, W, C)`, float32, C a multiple of 8) with window
    `(kh, kw)`, `strides` and symmetric `padding` `(ph, pw)` that never wins (-inf), for output gradient
    `dy`, by the native kernel: each output's gradient goes to the first maximum of its window in row-major
    order (torch's MaxPool2d and `flax.linen.max_pool`'s gradient do the same). One pass, where XLA:CPU
    lowers the pool's select-and-scatter to index iotas and a scatter (docs/benchmarks-history.md).
    """
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    call = jax.ffi.ffi_call(
        _target(POOL_GRAD_TARGET), jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential"
    )
    return call(
        x, dy, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw), ph=np.int64(ph), pw=np.int64(pw)
    )


def _affine_add_relu_reference(relu, y, mean, scale, shift, residual, rmean, rscale, rshift):
    out = (y - mean) * scale + shift + ((residual - rmean) * rscale + rshift)
    return jnp.maximum(out, 0.0) if relu else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _affine_add_relu(relu, *args):
    call = jax.ffi.ffi_call(
        _target(EPILOGUE_TARGET), jax.ShapeDtypeStruct(args[0].shape, jnp.float32), vmap_method="sequential"
    )
    return call(*args, relu=np.int64(relu))


def _affine_add_relu_fwd(relu, *args):
    return _affine_add_relu(relu, *args), args


def _affine_add_relu_bwd(relu, args, g):
    return jax.vjp(functools.partial(_affine_add_relu_reference, relu), *args)[1](g)


_affine_add_relu.defvjp(_affine_add_relu_fwd, _affine_add_relu_bwd)
