"""Building blocks shared by the ResNet and RegNet families (NHWC throughout).

Blocks never choose a dtype, a norm or a conv implementation themselves: the
network hands them partially applied `conv`/`norm` module constructors, as the
Flax ImageNet example does.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.ops import conv2d, native
from resnext_jax.ops.grouped_conv import block_diagonal_kernel, kernel_grad_by_taps, native_vjp, resolve_impl

Dtype = Any
ModuleDef = Any

# torchvision initializes convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "gelu": nn.gelu,
}
NORMS = ("batch", "group")


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name` (relu, silu or gelu)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


_NHWC = ("NHWC", "HWIO", "NHWC")


def _dense_conv(x, kernel, strides, padding, **dilation):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC, **dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d_canonical_grad(x: jax.Array, kernel: jax.Array, strides: tuple, padding: tuple, groups: int,
                          impl: str) -> jax.Array:
    """`resnext_jax.ops.conv2d` whose backward pass is written as plain NHWC/HWIO convolutions.

    Why: inside a `lax.scan` body (`scan_blocks=True`), XLA:CPU leaves autodiff's transposed
    convolutions (kernel `01oi`, or batch and feature swapped for the kernel gradient) in their
    non-canonical form and runs them through a slow generic loop: 3 scanned 3x3 convs at
    8x28x28x256 took minutes for one gradient instead of about 2 s. Here the input gradient is a
    dense conv of the dilated output gradient with the flipped kernel, and the kernel gradient a
    dense conv of the transposed input with the transposed output gradient (per group), both
    already in the layout XLA:CPU's fast convolution expects. Groups of at most 8 channels are merged
    into 16-channel block-diagonal chunks; a kernel with at least 16 input channels per group, at most 8
    groups and a 28x28 output takes its kernel gradient as one matmul per tap and group
    (`kernel_grad_by_taps`); a strided conv with at most 8 chunks takes its input gradient by output
    phases (`_input_grad`); all measured faster on CPU (docs/benchmarks.md). The
    forward is `conv2d(forward_only=True)`, so 'auto' may pick a forward whose own autodiff backward
    would be slow (narrow groups: 'chunked').
    """
    return conv2d(x, kernel, strides=strides, padding=padding, groups=groups, impl=impl, forward_only=True)


def _canonical_fwd(x, kernel, strides, padding, groups, impl):
    return conv2d_canonical_grad(x, kernel, strides, padding, groups, impl), (x, kernel)


# The backward pass merges narrow groups into chunks of this many input channels (block-diagonal kernels).
_BWD_CHUNK_CHANNELS = 16
# A conv's kernel gradient is one matmul per kernel tap (and group) when its output has at least this many
# pixels, its groups this many input channels and it has at most this many groups (RegNetY-1.6GF's 24-channel
# groups, 2-5 of them at 56x56 and 28x28: 150 -> 87 ms for the backward of its six such convs; 32 groups would
# be 288 matmuls to compile). A strided dense conv with fewer channels and such an output (the 3-channel 7x7/2
# stem) goes by space-to-depth taps instead: on the AVX-512 CPU 55 ms as 49 taps against 49 ms as a conv, on
# the AVX2 one 58 ms as taps, 46 ms as 16 space-to-depth taps, 120-142 ms as a conv.
_TAP_MATMUL_MIN_PIXELS = 28 * 28
_TAP_MATMUL_MIN_CHANNELS = 16
_TAP_MATMUL_MAX_GROUPS = 8
# A strided conv's input gradient goes by output phases (`_input_grad`) when it has at most this many chunks
# (stride**2 convs per chunk: ResNeXt-50's 16- and 32-chunk strided convs compiled 2 s slower for no gain).
_PHASE_MAX_CHUNKS = 8


def _kernel_grad_space_to_depth(x, dy, kernel_hw, strides, padding):
    """Kernel gradient of a strided dense conv with few input channels (the 3-channel 7x7/2 stem) as one
    `(s*s*C, N*H'*W') @ (N*H'*W', O)` matmul per tap of the stride-1 conv it becomes after space-to-depth.

    The padded input is cut into stride x stride blocks stacked on channels (`xs[n, Y, X, (a, b, c)] =
    x[n, s*Y + a, s*X + b, c]`); tap (p, q) of that conv is kernel taps (s*p + a, s*q + b) of the original,
    so a 7x7/2 kernel is 16 taps of 12 channels (64 taps' FLOPs for 49, the rest cropped) instead of 49
    matmuls of 3 channels. At batch 8 on the 2-core AMD EPYC (AVX2): 46 ms, against 58 ms by 49 taps and
    142 ms for XLA:CPU's convolution (docs/benchmarks.md).
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    n, h, w, c = x.shape
    _, ho, wo, out = dy.shape
    th, tw = -(-kh // sh), -(-kw // sw)  # taps per axis after space-to-depth
    hs, ws = ho - 1 + th, wo - 1 + tw  # blocks the taps reach
    # Pad (or crop: lax.pad takes negative padding) to exactly hs x ws blocks.
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (padding[0][0], hs * sh - h - padding[0][0], 0),
                                            (padding[1][0], ws * sw - w - padding[1][0], 0), (0, 0, 0)))
    xs = xp.reshape(n, hs, sh, ws, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, sh * sw * c)
    if out % 32 == 0 and native.runs_on(xs, dy):
        dw = native.few_channel_kernel_grad(xs, dy, (th, tw))
    else:
        dy2 = dy.reshape(-1, out)
        dw = jnp.stack([jnp.dot(xs[:, p:p + ho, q:q + wo].reshape(-1, sh * sw * c).T, dy2,
                                preferred_element_type=jnp.float32) for p in range(th) for q in range(tw)])
    dw = dw.reshape(th, tw, sh, sw, c, out).transpose(0, 2, 1, 3, 4, 5)
    return dw.reshape(th * sh, tw * sw, c, out)[:kh, :kw]


def _phase_taps(residue: int, size: int, stride: int, low: int) -> tuple[list[int], list[int]]:
    """Kernel taps that reach input rows `stride * t + residue`, and the output-row offset of each.

    Forward: `y[i] = sum_k x[stride * i + k - low] w[k]`, so input row `m = stride * t + residue` gets
    `dy[t + (residue + low - k) // stride] w[k]` from every tap `k` with `(residue + low - k) % stride == 0`.
    """
    taps = [k for k in range(size) if (residue + low - k) % stride == 0]
    return taps, [(residue + low - k) // stride for k in taps]


def _input_grad(dy: jax.Array, kernel: jax.Array, x_hw: tuple[int, int], strides: tuple, padding: tuple,
                by_phases: bool):
    """Input gradient of a dense NHWC/HWIO conv with kernel `(kh, kw, C, O)`, as plain convolutions.

    Stride 1, or not `by_phases`: one conv of `dy` with the flipped, transposed kernel (with zeros between
    the rows of `dy` for a stride). Strided `by_phases`: one small conv per output phase (input rows and
    columns `stride * t + r`) with the kernel taps that reach that phase, interleaved afterwards, because the
    dilated form spends stride**2 times the FLOPs on zeros. ResNet-50's 56x56x128 stride-2 3x3 conv at
    batch 8: 24.7 ms dilated, 14.2 ms by phases. Convs with more than `_PHASE_MAX_CHUNKS` chunks do not use
    phases: each chunk would become stride**2 convs, and a ResNeXt-50 train step (16- and 32-chunk strided convs)
    compiled in 20.8 instead of 14.2 s for no step time measurable above the noise (docs/benchmarks.md).
    """
    kh, kw, cin, _ = kernel.shape
    n, ho, wo, _ = dy.shape
    (h, w), (sh, sw) = x_hw, strides
    if (sh, sw) == (1, 1) or not by_phases:
        # One conv of the flipped, transposed kernel over `dy`, dilated by the stride.
        pads = native.input_grad_padding((h, w), (kh, kw), (sh, sw), padding, (ho, wo))
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        return _dense_conv(dy, flipped, (1, 1), pads, lhs_dilation=(sh, sw))
    th, tw = -(-h // sh), -(-w // sw)  # rows and columns per phase (the last phase may run past the input)
    rows = []
    for rh in range(sh):
        khs, dhs = _phase_taps(rh, kh, sh, padding[0][0])
        row = []
        for rw in range(sw):
            kws, dws = _phase_taps(rw, kw, sw, padding[1][0])
            if not khs or not kws:  # no tap reaches this phase (a kernel smaller than its stride)
                row.append(jnp.zeros((n, th, tw, cin), dy.dtype))
                continue
            # Offsets descend as the tap index ascends: reversed, the taps form a correlation kernel.
            sub = jnp.stack([jnp.stack([kernel[a, b].T for b in kws[::-1]]) for a in khs[::-1]])
            pads = ((-dhs[-1], th - 1 + dhs[0] - (ho - 1)), (-dws[-1], tw - 1 + dws[0] - (wo - 1)))
            row.append(_dense_conv(dy, sub, (1, 1), pads))
        rows.append(jnp.stack(row, 3))  # (N, th, tw, sw, C)
    dx = jnp.stack(rows, 2).reshape(n, th * sh, tw * sw, cin)  # (N, th, sh, tw, sw, C) interleaved
    return dx[:, :h, :w]


def _canonical_bwd(strides, padding, groups, impl, residuals, dy):
    x, kernel = residuals
    if resolve_impl(impl, groups, kernel.shape[:2], x.shape[-1], True,
                    native.supports(x.shape, kernel.shape, x.dtype, groups) and kernel.dtype == x.dtype == dy.dtype) == "native":
        return native_vjp(strides, padding, residuals, dy)
    kh, kw, cin_g, out = kernel.shape
    out_g = out // groups
    x_hw = x.shape[1:3]
    # Narrow groups are merged `per_chunk` at a time into one dense conv with a block-diagonal kernel (input
    # gradient) and one dense kernel gradient whose diagonal blocks are kept: 4-channel groups at
    # 8x56x56x128 take 36 instead of 65 ms this way; dense convs with 4 channels run far below XLA:CPU's speed.
    per_chunk = max(1, min(groups, _BWD_CHUNK_CHANNELS // cin_g))
    while groups % per_chunk:
        per_chunk -= 1
    chunks, ci, co = groups // per_chunk, per_chunk * cin_g, per_chunk * out_g
    # Per chunk, its (block-diagonal) dense kernel: (chunks, kh, kw, ci, co).
    chunk_kernels = kernel.reshape(kh, kw, cin_g, chunks, co).transpose(3, 0, 1, 2, 4)
    if per_chunk > 1:
        chunk_kernels = jax.vmap(functools.partial(block_diagonal_kernel, groups=per_chunk))(chunk_kernels)
    big_output = dy.shape[1] * dy.shape[2] >= _TAP_MATMUL_MIN_PIXELS
    by_taps = big_output and cin_g >= _TAP_MATMUL_MIN_CHANNELS and groups <= _TAP_MATMUL_MAX_GROUPS
    # A strided dense conv with few channels (the stem) takes its kernel gradient by space-to-depth taps.
    by_blocks = big_output and groups == 1 and cin_g < _TAP_MATMUL_MIN_CHANNELS and max(strides) > 1
    by_phases = chunks <= _PHASE_MAX_CHUNKS
    if not (by_taps or by_blocks):
        pads_w = []
        for size, k, stride, (low, _), out_size in ((x.shape[1], kh, strides[0], padding[0], dy.shape[1]),
                                                   (x.shape[2], kw, strides[1], padding[1], dy.shape[2])):
            dilated = (out_size - 1) * stride + 1
            pads_w.append((low, k - 1 + dilated - size - low))
        # Transpose the input and the output gradient once for all groups (per-group transposes were 2048
        # small fusions in a ResNeXt-50 step), then slice each chunk out of them.
        xt, dyt = x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3)
    dxs, dws = [], []
    for c in range(chunks):
        ins, outs = slice(c * ci, (c + 1) * ci), slice(c * co, (c + 1) * co)
        dxs.append(_input_grad(dy[..., outs], chunk_kernels[c], x_hw, strides, padding, by_phases))
        if by_blocks:  # (kh, kw, ci, co), one chunk
            dw = _kernel_grad_space_to_depth(x, dy, (kh, kw), strides, padding)
        elif by_taps:  # (kh, kw, ci, co)
            dw = kernel_grad_by_taps(x[..., ins], dy[..., outs], (kh, kw), strides, padding)
        else:  # (ci, kh, kw, co)
            dw = _dense_conv(xt[ins], dyt[..., outs], (1, 1), pads_w, rhs_dilation=strides).transpose(1, 2, 0, 3)
        if per_chunk > 1:  # (kh, kw, ci, co) -> the diagonal blocks, (kh, kw, cin_g, co)
            dw = jnp.einsum("hwaiao->hwiao", dw.reshape(kh, kw, per_chunk, cin_g, per_chunk, out_g))
            dw = dw.reshape(kh, kw, cin_g, co)
        dws.append(dw)
    cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)  # noqa: E731
    return cat(dxs).astype(x.dtype), cat(dws).astype(kernel.dtype)


conv2d_canonical_grad.defvjp(_canonical_fwd, _canonical_bwd)


class Conv2d(nn.Module):
    """A 2-D convolution with torch-style symmetric padding and a swappable implementation.

    The parameter layout is exactly `flax.linen.Conv(feature_group_count=groups)`'s:
    `kernel` of shape `(kh, kw, in_features // groups, features)` and an optional
    `bias` of shape `(features,)`. Only the arithmetic behind it changes with `impl`.

    Attributes:
      features: output channels.
      kernel_size: `(kh, kw)`.
      strides: `(sh, sw)`.
      padding: per-side padding; default `(k - 1) // 2`, i.e. torch's `padding=k//2` for odd k.
        Flax's `'SAME'` pads stride-2 convs asymmetrically and breaks torch parity.
      groups: channel groups (`feature_group_count`).
      use_bias: whether to add a bias.
      impl: grouped-conv implementation, one of `resnext_jax.ops.CONV_IMPLS`.
      canonical_grad: compute the backward pass with `conv2d_canonical_grad` (for scanned blocks on CPU).
      dtype: compute dtype; params stay `param_dtype`.
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] | None = None
    groups: int = 1
    use_bias: bool = False
    impl: str = "auto"
    canonical_grad: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array | Deferred, defer: bool = False) -> jax.Array | DeferredConv:
        """The conv of `x` (or of a `Deferred` norm's output); with `defer=True`, a dense 1x1 conv without bias
        in float32 on a CPU with the native kernels (and `impl` 'auto' or 'native'; `native.matmul_preferred`)
        is returned as a `DeferredConv` for the norm after it, which then also applies a `Deferred` input's
        norm."""
        deferred_input = x if isinstance(x, Deferred) else None
        if deferred_input is not None:
            x = deferred_input.x
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels do not divide into {self.groups} groups")
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_features // self.groups, self.features),
                            self.param_dtype)
        padding = self.padding
        if padding is None:
            padding = ((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)
        dtype = self.dtype or x.dtype
        padding = tuple(map(tuple, padding))
        inputs = x

        def compute() -> jax.Array:
            x = materialize(deferred_input) if deferred_input is not None else inputs
            # A 'gemm' conv's autodiff backward is already matmuls, which XLA:CPU handles well, scanned or not.
            if self.canonical_grad and resolve_impl(self.impl, self.groups, (kh, kw)) != "gemm":
                y = conv2d_canonical_grad(x.astype(dtype), kernel.astype(dtype), tuple(self.strides), padding,
                                          self.groups, self.impl)
            else:
                y = conv2d(x.astype(dtype), kernel.astype(dtype), strides=tuple(self.strides), padding=padding,
                           groups=self.groups, impl=self.impl)
            if self.use_bias:
                bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                y = y + bias.astype(dtype)
            return y

        if (defer and (kh, kw) == (1, 1) and self.groups == 1 and not self.use_bias and padding == ((0, 0), (0, 0))
                and self.impl in ("auto", "native") and x.ndim == 4
                and native.runs_on(x, kernel) and native.matmul_preferred()
                and native.supports_matmul((1, x.shape[-1]), kernel.shape[2:], dtype)):
            sh, sw = self.strides
            prologue = None
            if deferred_input is not None:
                d = deferred_input
                prologue = (d.multiplier, d.bias - d.mean * d.multiplier, d.relu)
            return DeferredConv(x[:, ::sh, ::sw, :], kernel.reshape(kernel.shape[2:]), compute, prologue)
        return compute()


class DeferredConv(NamedTuple):
    """A dense 1x1 conv not yet computed (`Conv2d(...)(x, defer=True)`), for the norm that follows it: at
    inference `BatchNorm` computes both as one `native.matmul_affine` (with a residual block's shortcut and
    ReLU), whose epilogue applies them to each register block before it is stored. Anywhere else the conv
    is computed as `Conv2d` would have (`materialize`)."""
    x: jax.Array                     # the input at the conv's stride, (N, H', W', K)
    kernel: jax.Array                # (K, features)
    compute: Callable[[], jax.Array]  # the conv as `Conv2d` computes it
    prologue: tuple | None = None     # a `Deferred` input's (scale, shift, relu) per input channel, or None


def make_norm(kind: str, *, train: bool, dtype: Dtype, axis_name: str | None, groups: int = 32,
              conv_impl: str = "xla") -> ModuleDef:
    """Returns a norm-layer constructor: batch norm (torch's eps and momentum) or group norm.

    Both are called as `norm(name=...)(x, residual=None, act=None)` and return `act(norm(x) + residual)`.
    Batch statistics are reduced in float32 even when `dtype` is bfloat16, and the
    running statistics are stored in float32. With a `conv_impl` that may use the native kernels
    ('auto', 'native'), batch norm's epilogue with a residual may too (`native_epilogue`).
    """
    if kind == "batch":
        return functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=dtype, axis_name=axis_name,
                                 native_epilogue=conv_impl in ("auto", "native"))
    if kind == "group":
        return functools.partial(_GroupNorm, num_groups=groups, dtype=dtype)
    raise ValueError(f"norm={kind!r} is not supported; use one of {NORMS}")


def _add_act(y: jax.Array, residual: jax.Array | None, act: Callable | None) -> jax.Array:
    if residual is not None:
        y = y + residual
    return act(y) if act is not None else y


def _native_sums_apply(x: jax.Array, use_native: bool) -> bool:
    """Whether batch norm's per-channel sums run as `native.channel_sums`: asked for, float32, on a CPU with
    the native kernels built."""
    return use_native and native.runs_on(x)


def _batch_moments(x: jax.Array, axis_name: str | None, use_native: bool = False):
    """Per-channel mean and (biased) variance over all but the last axis, in float32, synced over `axis_name`."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    count = x.size // x.shape[-1]
    if _native_sums_apply(x, use_native):
        sums, squares = native.channel_sums(x, x, jnp.zeros(x.shape[-1:], jnp.float32))
    else:
        sums, squares = jnp.sum(xf, axes), jnp.sum(xf * xf, axes)
    if axis_name is not None:
        sums, squares, count = lax.psum((sums, squares, count), axis_name)
    mean = sums / count
    # E[x^2] - E[x]^2, as flax.linen.BatchNorm's default (use_fast_variance) computes it.
    return mean, jnp.maximum(squares / count - mean * mean, 0.0), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, residual: jax.Array | None, epsilon: float,
                     relu: bool, axis_name: str | None, use_native: bool = False):
    """Training-mode batch norm, `relu(bn(x) + residual)`, with a hand-written backward pass.

    Returns `(y, mean, var)`: the output in `x.dtype` and the batch's float32 mean and biased variance
    (synchronized over `axis_name` when given, under shard_map/pmap). The same math as
    `flax.linen.BatchNorm` followed by the add and the ReLU, but the backward is one fused reduction and
    one elementwise pass from the saved input and output, where autodiff of the unfused ops leaves XLA:CPU
    more passes over the activations (docs/benchmarks.md). The cotangents of `mean` and `var` are ignored:
    they only feed the running statistics.

    `use_native`: with a residual, float32, on a CPU with the native kernels, the forward's normalize, add and
    ReLU run as `native.affine_add_relu` (once the statistics are reduced), which keeps XLA:CPU from
    recomputing the earlier blocks of a stage in every later block's forward (docs/benchmarks.md).
    """
    return _batch_norm_fwd(x, scale, bias, residual, epsilon, relu, axis_name, use_native)[0]


def _batch_norm_fwd(x, scale, bias, residual, epsilon, relu, axis_name, use_native=False):
    mean, var, count = _batch_moments(x, axis_name, use_native)
    inv = lax.rsqrt(var + epsilon)
    if use_native and residual is not None and native_epilogue_applies(x, x.dtype, residual):
        y = native.affine_add_relu(x, mean, scale * inv, bias, residual, relu=relu)
    else:
        y = (x.astype(jnp.float32) - mean) * (scale * inv) + bias
        y = _add_act(y, None if residual is None else residual.astype(jnp.float32), nn.relu if relu else None)
        y = y.astype(x.dtype)
    return (y, mean, var), (x, scale, mean, inv, count, y if relu else None, residual is not None)


def _batch_norm_bwd(epsilon, relu, axis_name, use_native, saved, cotangents):
    x, scale, mean, inv, count, y, has_residual = saved
    dy = cotangents[0].astype(jnp.float32)
    dz = jnp.where(y > 0, dy, 0.0) if relu else dy
    axes = tuple(range(x.ndim - 1))
    xhat = (x.astype(jnp.float32) - mean) * inv
    if _native_sums_apply(x, use_native):
        dbias, centred = native.channel_sums(dy, x, mean, y if relu else None)
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


class Deferred(NamedTuple):
    """An inference batch norm not yet applied: `(x - mean) * multiplier + bias` per channel
    (`BatchNorm(defer=True)`).

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


class BatchNorm(nn.Module):
    """Batch norm over the last axis with `flax.linen.BatchNorm`'s variables and update rule.

    Params `scale` and `bias`, batch statistics `mean` and `var` (float32), running averages updated as
    `momentum * old + (1 - momentum) * batch` with the biased batch variance, exactly as flax's, so
    checkpoints and converted weights are the same. Called as `bn(x, residual=None, act=None)`, it returns
    `act(bn(x) + residual)`; in training mode with `act=nn.relu` (or none) the add and the ReLU are fused
    into `batch_norm_train`'s hand-written backward pass, other activations are applied after it.

    `native_epilogue`: with a residual, ReLU (or no activation), float32 on a CPU where the native kernels
    are available, the epilogue runs as one native pass (in training, after the batch statistics)
    (`ops.native.affine_add_relu`). XLA:CPU would otherwise fuse it into both of the next block's
    consumers and recompute every earlier block of the stage there (docs/benchmarks.md, eighth session).
    With running statistics, `bn(x, defer=True)` (no residual, ReLU or no activation) returns a `Deferred`:
    for a shortcut, which the epilogue normalizes as it adds it (the residual may be a `Deferred` in every
    mode), or for a 1x1 conv's input, which `native.matmul_affine` normalizes as it reads it. `x` may be a
    `DeferredConv`: at inference the conv and this norm (with the residual and the ReLU) are then one
    `native.matmul_affine`.
    """
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    native_epilogue: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | DeferredConv, residual: jax.Array | Deferred | None = None,
                 act: Callable | None = None, defer: bool = False) -> jax.Array | Deferred:
        features = x.kernel.shape[-1] if isinstance(x, DeferredConv) else x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if isinstance(x, DeferredConv):
            if self.use_running_average and self.native_epilogue and _matmul_epilogue_applies(x, residual, act):
                multiplier = scale * lax.rsqrt(ra_var.value + self.epsilon)
                shift = bias - ra_mean.value * multiplier
                rows = x.x.shape[:-1]
                if residual is not None:
                    residual = materialize(residual).reshape(-1, features)
                prologue, prologue_relu = (x.prologue[:2], x.prologue[2]) if x.prologue else (None, False)
                y = native.matmul_affine(x.x.reshape(-1, x.x.shape[-1]), x.kernel, multiplier, shift, residual,
                                         relu=act is not None, prologue=prologue, prologue_relu=prologue_relu)
                return y.reshape(*rows, features)
            x = x.compute()
        dtype = self.dtype or x.dtype
        if self.use_running_average:
            multiplier = scale * lax.rsqrt(ra_var.value + self.epsilon)
            if (self.native_epilogue and defer and residual is None and (act is None or act is nn.relu)
                    and native_epilogue_applies(x, dtype)):
                return Deferred(x, ra_mean.value, multiplier, bias, relu=act is not None)
            if isinstance(residual, Deferred) and residual.relu:
                residual = materialize(residual)
            if residual is not None and self.native_epilogue and native_epilogue_applies(x, dtype, residual, act):
                shortcut = (residual.mean, residual.multiplier, residual.bias) if isinstance(residual, Deferred) else None
                return native.affine_add_relu(x, ra_mean.value, multiplier, bias,
                                              residual.x if shortcut else residual, shortcut, relu=act is not None)
            y = (x.astype(jnp.float32) - ra_mean.value) * multiplier + bias
            return _add_act(y.astype(dtype), materialize(residual), act)
        residual = materialize(residual)
        fuse = act is None or act is nn.relu
        y, mean, var = batch_norm_train(x.astype(dtype), scale, bias, residual if fuse else None, self.epsilon,
                                        fuse and act is not None, self.axis_name, self.native_epilogue)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y if fuse else _add_act(y, residual, act)


def _matmul_epilogue_applies(x: DeferredConv, residual, act) -> bool:
    """Whether `native.matmul_affine` can compute `act(bn(conv) + residual)` for a deferred conv: ReLU or no
    activation, a float32 residual (if any) of the conv's output shape."""
    if act is not None and act is not nn.relu or isinstance(residual, DeferredConv):
        return False
    if residual is None:
        return True
    value = residual.x if isinstance(residual, Deferred) else residual
    return value.dtype == jnp.float32 and value.shape == (*x.x.shape[:-1], x.kernel.shape[-1])


def native_epilogue_applies(x: jax.Array, dtype, residual: jax.Array | Deferred | None = None,
                            act: Callable | None = None) -> bool:
    """Whether `native.affine_add_relu` can compute `act(bn(x) + residual)` here: float32 throughout, ReLU
    or no activation, a residual (if given) of `x`'s shape, a CPU backend and the native kernels built."""
    residual = x if residual is None else residual.x if isinstance(residual, Deferred) else residual
    return (x.dtype == residual.dtype == jnp.dtype(dtype) == jnp.float32 and x.shape == residual.shape
            and (act is None or act is nn.relu) and jax.default_backend() == "cpu" and native.available())


class _GroupNorm(nn.Module):
    """GroupNorm that falls back to fewer groups when the channels do not divide by `num_groups`."""
    num_groups: int = 32
    dtype: Dtype | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x, residual=None, act=None, defer=False):
        """`defer` is accepted for `BatchNorm`'s interface; group norm always applies itself."""
        x = materialize(x)
        channels = x.shape[-1]
        groups = next(g for g in range(min(self.num_groups, channels), 0, -1) if channels % g == 0)
        y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, scale_init=self.scale_init,
                         name="gn")(x)
        return _add_act(y, materialize(residual), act)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per example, scaling survivors by 1 / (1 - rate).

    `rate` may be a traced scalar (a per-block rate scanned in by `scan_blocks`).
    """
    rate: float | jax.Array = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with 1x1 convs (biases on), as torchvision's RegNet has it.

    Attributes:
      squeeze_features: width of the bottleneck (`fc1` output).
      conv: conv constructor; the two 1x1 convs are named `fc1` and `fc2`.
    """
    squeeze_features: int
    conv: ModuleDef
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Pool in float32 so a bf16 model averages a 56x56 map without losing digits.
        scale = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        scale = self.conv(self.squeeze_features, (1, 1), use_bias=True, name="fc1")(scale)
        scale = self.act(scale)
        scale = self.conv(x.shape[-1], (1, 1), use_bias=True, name="fc2")(scale)
        return x * nn.sigmoid(scale)


def needs_canonical_grad() -> bool:
    """Whether convs should use `conv2d_canonical_grad`: on XLA:CPU, scanned or not (see its docstring).

    Measured on the 2-core CPU (ResNeXt-50 train step, batch 8): scanned blocks go from minutes to seconds;
    unscanned, 1.99 vs 1.88 img/s and 25.0 vs 26.9 s compile (docs/benchmarks.md).
    """
    return jax.default_backend() == "cpu"


def scan_blocks(block: nn.Module, x: jax.Array, rates: Sequence[float], train: bool) -> jax.Array:
    """Applies `block` `len(rates)` times under `nn.scan`, its variables stacked on a leading axis.

    For the identical blocks 1..n-1 of a stage: XLA compiles the block once instead of n-1 times.
    Each application gets its own init and dropout RNG and its own stochastic-depth rate.
    """
    def body(module, carry, rate):
        return module(carry, train, drop_path_rate=rate), None

    scanned = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True, "dropout": True}, length=len(rates))
    # All-zero rates stay a static 0.0, so DropPath is skipped at trace time as in the unrolled model.
    xs = jnp.asarray(rates, jnp.float32) if any(rates) else None
    x, _ = scanned(block, x, xs)
    return x


def stem_and_block_factories(network: nn.Module, train: bool):
    """The `conv`, `norm` and activation every block of `network` (a ResNet or RegNet) is built from."""
    conv = functools.partial(Conv2d, dtype=network.dtype, impl=network.conv_impl,
                             canonical_grad=needs_canonical_grad())
    norm = make_norm(network.norm, train=train, dtype=network.dtype, axis_name=network.bn_axis_name,
                     groups=network.norm_groups, conv_impl=network.conv_impl)
    return conv, norm, get_activation(network.activation)


def stem_max_pool(x: jax.Array, train: bool) -> jax.Array:
    """3x3 max pool, stride 2, padding 1 with -inf (torch's `MaxPool2d(3, 2, 1)`).

    The forward pools each spatial axis in turn as the max of its even elements, its odd elements and the
    odd ones shifted by one (`-inf` in front): strided slices that XLA:CPU fuses with the stem's batch norm
    and ReLU, with no padded copy of the 8 x 112 x 112 x 64 input. Stem conv, batch norm, ReLU and pool at
    batch 8: 14.3 ms, against 16.2 ms for the max of 9 slices of a padded copy and 6.0 ms more for
    `reduce_window` after a separate batch-norm pass (docs/benchmarks.md). The gradient goes to the first
    maximum of each window, as torch's does: in training on a CPU with the native kernels by
    `native.max_pool_grad` (one pass; XLA:CPU's select-and-scatter took ~35 ms of a ResNeXt-50 train step,
    docs/benchmarks.md, tenth session); training elsewhere (other backends, bfloat16) runs `nn.max_pool`.
    """
    if train:
        if x.shape[-1] % 8 == 0 and native.runs_on(x):
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
    """The stem pool with its gradient by `native.max_pool_grad` (float32, channels a multiple of 8, CPU)."""
    return _max_pool_3x3s2_forward(x)


def _max_pool_3x3s2_fwd(x):
    return _max_pool_3x3s2_forward(x), x


def _max_pool_3x3s2_bwd(x, dy):
    return (native.max_pool_grad(x, dy, (3, 3), (2, 2), (1, 1)),)


_max_pool_3x3s2.defvjp(_max_pool_3x3s2_fwd, _max_pool_3x3s2_bwd)


def run_stage(block: Callable[..., nn.Module], x: jax.Array, rates: Sequence[float], train: bool, prefix: str,
              scan: bool, first_stride: int) -> jax.Array:
    """Runs one stage: block `{prefix}_0` (stride, projection), then the identical blocks 1..n-1.

    Those run one module each (`{prefix}_{i}`) or, with `scan`, as one scanned module `{prefix}_rest`.
    """
    x = block(strides=first_stride, drop_path_rate=rates[0], name=f"{prefix}_0")(x, train)
    if scan and len(rates) > 1:
        return scan_blocks(block(name=f"{prefix}_rest"), x, rates[1:], train)
    for index in range(1, len(rates)):
        x = block(drop_path_rate=rates[index], name=f"{prefix}_{index}")(x, train)
    return x


def classifier_head(network: nn.Module, features: dict, train: bool, return_features: bool,
                    kernel_init: Callable = nn.initializers.lecun_normal()):
    """Pool the last stage, dropout, the `fc` classifier; float32 logits or the whole feature dict."""
    x = global_avg_pool(features[f"stage{len(features)}"])
    features["pre_logits"] = x
    x = nn.Dropout(network.dropout_rate, deterministic=not train)(x)
    if network.num_classes:
        x = nn.Dense(network.num_classes, dtype=network.dtype, kernel_init=kernel_init, name="fc")(x)
    logits = x.astype(jnp.float32)
    return {**features, "logits": logits} if return_features else logits


# Top-level module names of per-block variables: ResNet's `layer{s}_{b}`, RegNet's `block{s}_{b}`.
_BLOCK_NAME = re.compile(r"^(layer|block)(\d+)_(\d+)$")
_STACKED_NAME = re.compile(r"^(layer|block)(\d+)_rest$")


def stack_blocks(variables: Mapping) -> dict:
    """Converts variables from the default layout to the `scan_blocks=True` one.

    In every collection, blocks 1..n-1 of a stage (`layer{s}_1`.. or `block{s}_1`..) are stacked
    leaf by leaf on a new leading axis under `layer{s}_rest` (`block{s}_rest`); block 0 and
    everything else stay as they are. Exact (no arithmetic); `unstack_blocks` inverts it.
    """
    out = {}
    for collection, tree in variables.items():
        tree, stages = dict(tree), {}
        for name in list(tree):
            match = _BLOCK_NAME.match(name)
            if match and int(match.group(3)) > 0:
                stages.setdefault((match.group(1), match.group(2)), {})[int(match.group(3))] = tree.pop(name)
        for (prefix, stage), blocks in stages.items():
            if sorted(blocks) != list(range(1, len(blocks) + 1)):
                raise ValueError(f"{collection}: {prefix}{stage} has blocks {sorted(blocks)}; stacking needs 1..n-1")
            tree[f"{prefix}{stage}_rest"] = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                                         *[blocks[i] for i in sorted(blocks)])
        out[collection] = tree
    return out


def unstack_blocks(variables: Mapping) -> dict:
    """Converts `scan_blocks=True` variables back to the default layout (inverse of `stack_blocks`).

    Variables already in the default layout pass through unchanged.
    """
    out = {}
    for collection, tree in variables.items():
        tree = dict(tree)
        for name in list(tree):
            match = _STACKED_NAME.match(name)
            if not match:
                continue
            stacked = tree.pop(name)
            count = jax.tree.leaves(stacked)[0].shape[0]
            for index in range(count):
                tree[f"{match.group(1)}{match.group(2)}_{index + 1}"] = jax.tree.map(lambda leaf: leaf[index], stacked)
        out[collection] = tree
    return out


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Linearly increasing stochastic-depth rates, 0 for the first block and `drop_path_rate` for the last."""
    if num_blocks <= 1:
        return [drop_path_rate] * num_blocks
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C), averaged in float32.

    A contraction with `1 / (H W)`, not a reduce: XLA:CPU (jax 0.10.2) drops NaN from a reduction into which
    the last block's ReLU (a max) is fused, which returned finite logits for an image with one NaN pixel and
    blinded the non-finite-loss guard (tests/test_nonfinite.py).
    """
    h, w = x.shape[1:3]
    weights = jnp.full((h, w), 1.0 / (h * w), jnp.float32)
    return jnp.einsum("nhwc,hw->nc", x.astype(jnp.float32), weights, precision=lax.Precision.HIGHEST)
