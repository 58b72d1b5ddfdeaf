"""A convolution whose backward pass is written as plain NHWC/HWIO convolutions and matmuls.

Why: XLA:CPU leaves autodiff's transposed convolutions (kernel `01oi`, or batch and feature swapped for the
kernel gradient) in their non-canonical form and runs them through a slow generic loop, above all inside a
`lax.scan` body (`scan_blocks=True`), where one gradient took minutes instead of seconds. Here every
convolution of the backward pass is in the layout XLA:CPU's fast convolution expects, or a matmul, or a native
kernel (docs/benchmarks-history.md has the measurements behind each threshold below).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax import cpu
from resnext_jax.ops.grouped_conv import block_diagonal_kernel, conv2d, kernel_grad_by_taps, native_vjp, resolve_impl

_NHWC = ("NHWC", "HWIO", "NHWC")


def _dense_conv(x, kernel, strides, padding, **dilation):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC, **dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv2d_canonical_grad(
    x: jax.Array, kernel: jax.Array, strides: tuple, padding: tuple, groups: int, impl: str, platform: str = "cpu"
) -> jax.Array:
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
    phases (`_input_grad`); all measured faster on CPU (docs/benchmarks-history.md). The
    forward is `conv2d(forward_only=True)`, so 'auto' may pick a forward whose own autodiff backward
    would be slow (narrow groups: 'chunked').
    """
    return conv2d(
        x, kernel, strides=strides, padding=padding, groups=groups, impl=impl, forward_only=True, platform=platform
    )


def _canonical_fwd(x, kernel, strides, padding, groups, impl, platform):
    return conv2d_canonical_grad(x, kernel, strides, padding, groups, impl, platform), (x, kernel)


# The backward pass merges narrow groups into chunks of this many input channels (block-diagonal kernels).
_BWD_CHUNK_CHANNELS = 16
# A conv's kernel gradient is one matmul per kernel tap (and group) when its output has at least this many
# pixels, its groups this many input channels and it has at most this many groups (RegNetY-1.6GF's 24-channel
# groups; 32 groups would be 288 matmuls to compile). A strided dense conv with fewer channels and such an output
# (the 3-channel 7x7/2 stem) goes by space-to-depth taps instead. Measurements: docs/benchmarks-history.md.
_TAP_MATMUL_MIN_PIXELS = 28 * 28
_TAP_MATMUL_MIN_CHANNELS = 16
_TAP_MATMUL_MAX_GROUPS = 8
# A strided conv's input gradient goes by output phases (`_input_grad`) when it has at most this many chunks
# (stride**2 convs per chunk: more chunks compile slower for no gain).
_PHASE_MAX_CHUNKS = 8


def _kernel_grad_space_to_depth(x, dy, kernel_hw, strides, padding, platform: str = "cpu"):
    """Kernel gradient of a strided dense conv with few input channels (the 3-channel 7x7/2 stem) as one
    `(s*s*C, N*H'*W') @ (N*H'*W', O)` matmul per tap of the stride-1 conv it becomes after space-to-depth.

    The padded input is cut into stride x stride blocks stacked on channels (`xs[n, Y, X, (a, b, c)] =
    x[n, s*Y + a, s*X + b, c]`); tap (p, q) of that conv is kernel taps (s*p + a, s*q + b) of the original,
    so a 7x7/2 kernel is 16 taps of 12 channels (64 taps' FLOPs for 49, the rest cropped) instead of 49
    matmuls of 3 channels, and faster than both those taps and XLA:CPU's convolution (docs/benchmarks-history.md).
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    n, h, w, c = x.shape
    _, ho, wo, out = dy.shape
    th, tw = -(-kh // sh), -(-kw // sw)  # taps per axis after space-to-depth
    hs, ws = ho - 1 + th, wo - 1 + tw  # blocks the taps reach
    # Pad (or crop: lax.pad takes negative padding) to exactly hs x ws blocks.
    xp = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        (
            (0, 0, 0),
            (padding[0][0], hs * sh - h - padding[0][0], 0),
            (padding[1][0], ws * sw - w - padding[1][0], 0),
            (0, 0, 0),
        ),
    )
    xs = xp.reshape(n, hs, sh, ws, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, sh * sw * c)
    if cpu.eligible("few_channel_kernel_grad", platform, xs, dy, shape_ok=out % 32 == 0):
        dw = cpu.few_channel_kernel_grad(xs, dy, (th, tw))
    else:
        dy2 = dy.reshape(-1, out)
        dw = jnp.stack(
            [
                jnp.dot(
                    xs[:, p : p + ho, q : q + wo].reshape(-1, sh * sw * c).T, dy2, preferred_element_type=jnp.float32
                )
                for p in range(th)
                for q in range(tw)
            ]
        )
    dw = dw.reshape(th, tw, sh, sw, c, out).transpose(0, 2, 1, 3, 4, 5)
    return dw.reshape(th * sh, tw * sw, c, out)[:kh, :kw]


def _phase_taps(residue: int, size: int, stride: int, low: int) -> tuple[list[int], list[int]]:
    """Kernel taps that reach input rows `stride * t + residue`, and the output-row offset of each.

    Forward: `y[i] = sum_k x[stride * i + k - low] w[k]`, so input row `m = stride * t + residue` gets
    `dy[t + (residue + low - k) // stride] w[k]` from every tap `k` with `(residue + low - k) % stride == 0`.
    """
    taps = [k for k in range(size) if (residue + low - k) % stride == 0]
    return taps, [(residue + low - k) // stride for k in taps]


def _input_grad(
    dy: jax.Array, kernel: jax.Array, x_hw: tuple[int, int], strides: tuple, padding: tuple, by_phases: bool
):
    """Input gradient of a dense NHWC/HWIO conv with kernel `(kh, kw, C, O)`, as plain convolutions.

    Stride 1, or not `by_phases`: one conv of `dy` with the flipped, transposed kernel (with zeros between
    the rows of `dy` for a stride). Strided `by_phases`: one small conv per output phase (input rows and
    columns `stride * t + r`) with the kernel taps that reach that phase, interleaved afterwards, because the
    dilated form spends stride**2 times the FLOPs on zeros. Convs with more than `_PHASE_MAX_CHUNKS` chunks do
    not use phases: each chunk would become stride**2 convs, which compile much slower for no step time
    measurable above the noise (docs/benchmarks-history.md).
    """
    kh, kw, cin, _ = kernel.shape
    n, ho, wo, _ = dy.shape
    (h, w), (sh, sw) = x_hw, strides
    if (sh, sw) == (1, 1) or not by_phases:
        # One conv of the flipped, transposed kernel over `dy`, dilated by the stride.
        pads = cpu.input_grad_padding((h, w), (kh, kw), (sh, sw), padding, (ho, wo))
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


def _canonical_bwd(strides, padding, groups, impl, platform, residuals, dy):
    x, kernel = residuals
    if (
        resolve_impl(
            impl,
            groups,
            kernel.shape[:2],
            x.shape[-1],
            True,
            cpu.supports(x.shape, kernel.shape, x.dtype, groups) and kernel.dtype == x.dtype == dy.dtype,
            platform,
        )
        == "native"
    ):
        return native_vjp(strides, padding, residuals, dy)
    kh, kw, cin_g, out = kernel.shape
    out_g = out // groups
    x_hw = x.shape[1:3]
    # Narrow groups are merged `per_chunk` at a time into one dense conv with a block-diagonal kernel (input
    # gradient) and one dense kernel gradient whose diagonal blocks are kept: faster than per-group convs, since
    # dense convs with 4 channels run far below XLA:CPU's speed.
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
        for size, k, stride, (low, _), out_size in (
            (x.shape[1], kh, strides[0], padding[0], dy.shape[1]),
            (x.shape[2], kw, strides[1], padding[1], dy.shape[2]),
        ):
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
            dw = _kernel_grad_space_to_depth(x, dy, (kh, kw), strides, padding, platform)
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
