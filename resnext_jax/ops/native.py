"""Native CPU kernels for grouped (and dense 3x3) convolutions, built on first use, called through `jax.ffi`.

XLA:CPU has no fast grouped convolution: every formulation from its primitives either wastes FLOPs on
zeros (block-diagonal chunks) or runs many tiny dense convs, and its convolution backward runs far below
its matmul speed (docs/benchmarks.md). The C++ kernels in `native/grouped_conv.cc` compute a grouped conv's
forward pass, input gradient and kernel gradient with AVX-512 or AVX2 FMAs, no FLOPs on zeros, on XLA's own
intra-op threads: at batch 8, the input and kernel gradients of ResNeXt-50's 16 grouped convs take 62 ms
against 253 ms for the best pure-XLA implementation, and ResNet-50's dense 3x3 convs, forward and both
gradients, 321 against 508 ms (docs/benchmarks.md).

Beside the convolutions, `native/` holds four passes that XLA:CPU runs slowly: the residual block
epilogue (`affine_add_relu`), batch norm's training sums (`channel_sums`), the stem max pool's gradient
(`max_pool_grad`) and the stem's kernel gradient after space-to-depth (`few_channel_kernel_grad`), and
one more convolution: the stems' 3-channel forward (`few_channel_conv`), and a matmul with its batch norm,
shortcut and ReLU as the epilogue for inference's 1x1 convs (`matmul_affine`).

The kernels are compiled once per source, compiler and jaxlib version with the system's C++ compiler
(`$CXX`, else `g++`, `c++` or `clang++`) into `$RESNEXT_JAX_CACHE` (default `~/.cache/resnext_jax`), then
loaded and registered as XLA FFI targets. They need an x86-64 CPU with AVX2 and FMA; with AVX-512F and
AVX-512VL they are built for AVX-512 (16-lane vectors, 32 registers). `RESNEXT_JAX_NATIVE_ISA=avx2` builds
the AVX2 variant on an AVX-512 CPU (to test it there), and `RESNEXT_JAX_NATIVE=0` turns them off. When
they are unavailable, `conv2d(impl='auto')` uses the pure-XLA implementations and `unavailable_reason()`
says why; `isa()` says which build runs.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

NATIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
# Compiled together into one library; the headers are part of the build key.
SOURCES = tuple(os.path.join(NATIVE_DIR, name)
                for name in ("grouped_conv.cc", "epilogue.cc", "channel_sums.cc", "max_pool.cc", "few_channel_grad.cc",
                             "few_channel_conv.cc", "matmul.cc"))
HEADERS = tuple(os.path.join(NATIVE_DIR, name) for name in ("parallel.h", "tail.h"))
TARGET = "resnext_jax_grouped_conv_forward"
GRAD_TARGET = "resnext_jax_grouped_conv_kernel_grad"
EPILOGUE_TARGET = "resnext_jax_affine_add_relu"
SUMS_TARGET = "resnext_jax_channel_sums"
POOL_GRAD_TARGET = "resnext_jax_max_pool_grad"
FEW_CHANNEL_GRAD_TARGET = "resnext_jax_few_channel_kernel_grad"
FEW_CHANNEL_CONV_TARGET = "resnext_jax_few_channel_conv"
MATMUL_TARGET = "resnext_jax_matmul_affine"
# FFI target -> symbol in the built library.
SYMBOLS = {TARGET: "ResnextJaxGroupedConvForward", GRAD_TARGET: "ResnextJaxGroupedConvKernelGrad",
           EPILOGUE_TARGET: "ResnextJaxAffineAddRelu", SUMS_TARGET: "ResnextJaxChannelSums",
           POOL_GRAD_TARGET: "ResnextJaxMaxPoolGrad", FEW_CHANNEL_GRAD_TARGET: "ResnextJaxFewChannelKernelGrad",
           FEW_CHANNEL_CONV_TARGET: "ResnextJaxFewChannelConv", MATMUL_TARGET: "ResnextJaxMatmulAffine"}
OPT_OUT = "RESNEXT_JAX_NATIVE"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# Instruction set -> (the /proc/cpuinfo flags it needs, compiler flags). The kernels are written for both
# (`__AVX512F__` selects); the best the CPU has is built, or the one `RESNEXT_JAX_NATIVE_ISA` names.
ISAS = {"avx512": ({"avx512f", "avx512vl", "fma"}, ("-mavx512f", "-mavx512vl", "-mfma")),
        "avx2": ({"avx2", "fma"}, ("-mavx2", "-mfma"))}
ISA_ENV = "RESNEXT_JAX_NATIVE_ISA"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable_isas(flags: set[str] | None = None) -> list[str]:
    """The instruction sets of `ISAS` this CPU runs, best first (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags() if flags is None else flags
    return [isa for isa, (needs, _) in ISAS.items() if needs <= flags]


def select_isa(environ=os.environ, flags: set[str] | None = None) -> tuple[str | None, str]:
    """(instruction set to build, or None; why): the best this CPU runs, or `$RESNEXT_JAX_NATIVE_ISA`."""
    flags = cpu_flags() if flags is None else flags
    runnable = runnable_isas(flags)
    wanted = environ.get(ISA_ENV, "")
    if wanted:
        if wanted not in ISAS:
            return None, f"{ISA_ENV}={wanted!r} is not one of {sorted(ISAS)}"
        if wanted not in runnable:
            missing = ", ".join(sorted(ISAS[wanted][0] - flags))
            return None, f"{ISA_ENV}={wanted}, but this CPU lacks {missing}; unset it to build the best it has"
        return wanted, f"{ISA_ENV}={wanted}"
    if not runnable:
        missing = ", ".join(sorted(ISAS["avx2"][0] - flags))
        return None, f"it needs a CPU with AVX2 and FMA ({missing} not in /proc/cpuinfo's flags)"
    return runnable[0], "the best this CPU has"


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else the first of g++, c++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "resnext_jax")
    return os.environ.get("RESNEXT_JAX_CACHE", default)


def _build(cxx: str, isa: str) -> str:
    """Compiles the kernels for `isa` unless a build of this source, compiler, instruction set and jaxlib
    exists; returns the .so path."""
    import jaxlib

    source = b""
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            source += f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    flags = FLAGS + ISAS[isa][1]
    key = hashlib.sha256(source + repr((version, flags, jaxlib.__version__)).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), f"grouped_conv-{isa}-{key}.so")
    if os.path.exists(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    command = [cxx, *flags, f"-I{jax.ffi.include_dir()}", *SOURCES, "-o", partial]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        os.unlink(partial)
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
    return target


# FFI target -> the name it is registered under in this process (filled by `_load`).
_REGISTERED: dict[str, str] = {}


@functools.cache
def _load() -> tuple[bool, str]:
    """(available, reason): builds and registers the kernel once per process."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False, f"{OPT_OUT}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"it needs an x86-64 CPU (this is {platform.machine()})"
    chosen, why = select_isa()
    if chosen is None:
        return False, why
    cxx = compiler()
    if cxx is None:
        return False, "no C++ compiler found: install g++ (or set CXX) to build it"
    try:
        path = _build(cxx, chosen)
        library = ctypes.cdll.LoadLibrary(path)
        # Registered under names unique to the build, so that two versions of this package can run in one
        # process (benchmarks/ab.py) without one calling the other's kernels.
        build = os.path.basename(path)[:-len(".so")].rsplit("-", 1)[-1]
        for target, symbol in SYMBOLS.items():
            _REGISTERED[target] = f"{target}_{build}"
            jax.ffi.register_ffi_target(_REGISTERED[target], jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        return False, f"building or loading it failed: {e}"
    _ISA[0] = chosen
    return True, "built"


_ISA: list[str | None] = [None]


def isa() -> str | None:
    """The instruction set the loaded kernels were built for ('avx512' or 'avx2'), None where unavailable."""
    return _ISA[0] if available() else None


def _target(name: str) -> str:
    """The registered name of FFI target `name`, building the kernels first if need be."""
    if not available():
        raise RuntimeError(f"the native grouped-conv kernels are unavailable: {unavailable_reason()}")
    return _REGISTERED[name]


def available() -> bool:
    """Whether the native kernels can run here (builds them on the first call)."""
    return _load()[0]


def runs_on(*arrays: jax.Array) -> bool:
    """Whether the kernels can take these arrays here: all float32, the default backend a CPU, the kernels
    built (the callers' shape conditions are their own)."""
    return (all(a.dtype == jnp.float32 for a in arrays) and jax.default_backend() == "cpu" and available())


def unavailable_reason() -> str | None:
    ok, reason = _load()
    return None if ok else reason


# Groups narrower than 8 channels the kernels are compiled for (`KernelsFor` in native/grouped_conv.cc), with
# channels a multiple of 16; wider groups need a multiple of 8 channels.
NARROW_GROUP_WIDTHS = (1, 2, 4)


def supports(x_shape, kernel_shape, dtype, groups: int) -> bool:
    """Whether the kernels handle this conv: float32, NHWC/HWIO, as many output as input channels per
    group, and a multiple of 8 channels per group (dense convs included: one group of all the channels) or
    `NARROW_GROUP_WIDTHS` channels per group and channels a multiple of 16."""
    channels, (_, _, cin_g, out) = x_shape[-1], kernel_shape
    return (jnp.dtype(dtype) == jnp.float32 and len(x_shape) == 4 and out == channels
            and cin_g * groups == channels
            and (cin_g % 8 == 0 or (cin_g in NARROW_GROUP_WIDTHS and channels % 16 == 0)))


def grouped_conv_forward(x: jax.Array, kernel: jax.Array, strides, padding, input_dilation=(1, 1),
                         transpose_kernel: bool = False) -> jax.Array:
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
    call = jax.ffi.ffi_call(_target(TARGET), jax.ShapeDtypeStruct((n, ho, wo, out), jnp.float32),
                            vmap_method="sequential")
    return call(x, kernel, sh=np.int64(sh), sw=np.int64(sw), ph=np.int64(pt), pw=np.int64(pl), dh=np.int64(dh),
                dw=np.int64(dw), transpose=np.int64(transpose_kernel))


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
    return [(k - 1 - low, size - (out_size - 1) * stride - 1 + low) for size, k, stride, (low, _), out_size
            in zip(x_hw, kernel_hw, strides, padding, dy_hw)]


def grouped_conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape, strides, padding) -> jax.Array:
    """The kernel gradient `(kh, kw, C/G, C)` of `grouped_conv_forward(x, kernel, strides, padding)` for
    output gradient `dy`."""
    call = jax.ffi.ffi_call(_target(GRAD_TARGET), jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                            vmap_method="sequential")
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return call(x, dy, sh=np.int64(sh), sw=np.int64(sw), ph=np.int64(pt), pw=np.int64(pl))


def affine_add_relu(y: jax.Array, mean: jax.Array, scale: jax.Array, shift: jax.Array, residual: jax.Array,
                    residual_affine: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                    relu: bool = True) -> jax.Array:
    """`relu((y - mean) * scale + shift + residual')` by the native kernel, where `residual'` is `residual`,
    or `(residual - m) * s + b` for `residual_affine=(m, s, b)`.

    float32, channels last; the vectors have one entry per channel. A residual block's inference epilogue:
    its last batch norm with running statistics (`scale = gamma / sqrt(var + eps)`), the shortcut (or its
    batch norm), the add and the ReLU, in one pass whose result XLA reads but does not recompute
    (docs/benchmarks.md, eighth session). Differentiable: the backward pass is the autodiff of the same
    formula in JAX (for gradients through an inference-mode model, e.g. saliency maps).
    """
    if residual_affine is None:
        zeros = jnp.zeros(y.shape[-1:], jnp.float32)
        residual_affine = (zeros, jnp.ones_like(zeros), zeros)
    return _affine_add_relu(bool(relu), y, mean, scale, shift, residual, *residual_affine)


def channel_sums(a: jax.Array, b: jax.Array, shift: jax.Array, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-channel `(sum(a'), sum(a' * (b - shift)))` over all but the last axis by the native kernel, where
    `a'` is `a`, or `where(mask > 0, a, 0)`. float32, channels last; `b` (and `mask`) of `a`'s shape, `shift`
    one entry per channel. No VJP: training-mode batch norm's statistics, `(x, x, 0)` for sum x and sum x^2,
    and its backward's, `(dy, x, mean, mask=y)` for sum dz and sum dz (x - mean) (one pass where XLA:CPU's
    reductions ran at 6-15 GB/s; docs/benchmarks.md, tenth session). The sums are in float32 over runs of
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
    channels (the stem after space-to-depth, `models.layers._kernel_grad_space_to_depth`): each tap is read
    in place, where XLA ops slice the input once per tap (docs/benchmarks.md, tenth session).
    """
    th, tw = taps
    out = jax.ShapeDtypeStruct((th, tw, xs.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(_target(FEW_CHANNEL_GRAD_TARGET), out, vmap_method="sequential")(xs, dy)


# At most this many input channels for `few_channel_conv` (the stems' 3; wider convs have `grouped_conv_forward`).
FEW_CHANNELS = 4


def supports_few_channels(x_shape, kernel_shape, dtype, groups: int) -> bool:
    """Whether `few_channel_conv` takes this conv: float32, dense, at most `FEW_CHANNELS` input channels, a
    multiple of 16 output channels."""
    return (jnp.dtype(dtype) == jnp.float32 and len(x_shape) == 4 and groups == 1
            and x_shape[-1] == kernel_shape[2] <= FEW_CHANNELS and kernel_shape[-1] % 16 == 0)


def few_channel_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """The dense conv `(N, H, W, C) * (kh, kw, C, O) -> (N, H', W', O)` with `padding` `((top, bottom),
    (left, right))` (negative crops) by the native kernel (no VJP), for few input channels (the stems'
    3, `supports_few_channels`): the input is padded here, then each output pixel's `kw * C` inputs per kernel
    row are read in place as one matmul row. At batch 8 on the 2-core AMD EPYC the ResNet stem's 7x7/2 conv
    runs at about twice XLA:CPU's speed (docs/benchmarks.md, eleventh session).
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
# on an AVX-512 CPU (16 lanes, measured last in the eighth session) XLA's own matmul is left the 1x1 convs.
MATMUL_ISAS = ("avx2",)


def matmul_preferred() -> bool:
    """Whether the models run their inference 1x1 convs through `matmul_affine` here: the kernels built for
    one of `MATMUL_ISAS`."""
    return isa() in MATMUL_ISAS


def supports_matmul(a_shape, b_shape, dtype) -> bool:
    """Whether `matmul_affine` takes `a @ b`: float32, 2-D, the columns a multiple of `MATMUL_COLUMNS`."""
    return (jnp.dtype(dtype) == jnp.float32 and len(a_shape) == len(b_shape) == 2 and a_shape[1] == b_shape[0]
            and b_shape[1] % MATMUL_COLUMNS == 0)


def matmul_affine(a: jax.Array, b: jax.Array, scale: jax.Array, shift: jax.Array, residual: jax.Array | None = None,
                  relu: bool = False, prologue: tuple[jax.Array, jax.Array] | None = None,
                  prologue_relu: bool = False) -> jax.Array:
    """`act(a' @ b * scale + shift (+ residual))` by the native kernel, `act` ReLU or none, where `a'` is `a`, or
    `act'(a * s + h)` for `prologue=(s, h)` with `act'` ReLU if `prologue_relu`: `a` `(M, K)`, `b` `(K, N)`
    (`supports_matmul`), `scale` and `shift` `(N,)`, `residual` `(M, N)`, `s` and `h` `(K,)`; float32.

    Inference's 1x1 conv with the batch norm after it (and a residual block's shortcut and ReLU) applied to each
    register block before it is stored, and the batch norm and ReLU before it applied to each 6 rows of `a` as
    they are read, where XLA:CPU writes the matmul's output and reads it back once or twice and normalizes
    the input in a pass of its own (docs/benchmarks.md, twelfth session). Differentiable: the backward pass is
    the autodiff of the same formula in JAX.
    """
    dummy = jnp.zeros((1,), jnp.float32)
    a_scale, a_shift = prologue if prologue is not None else (dummy, dummy)
    return _matmul_affine(bool(relu), residual is not None, prologue is not None, bool(prologue_relu), a, b, scale,
                          shift, dummy if residual is None else residual, a_scale, a_shift)


def _matmul_affine_reference(relu, with_residual, prologue, prologue_relu, a, b, scale, shift, residual, a_scale,
                             a_shift):
    if prologue:
        a = a * a_scale + a_shift
        a = jnp.maximum(a, 0.0) if prologue_relu else a
    out = jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST) * scale + shift
    if with_residual:
        out = out + residual
    return jnp.maximum(out, 0.0) if relu else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matmul_affine(relu, with_residual, prologue, prologue_relu, a, b, *args):
    call = jax.ffi.ffi_call(_target(MATMUL_TARGET), jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(a, b, *args, relu=np.int64(relu), with_residual=np.int64(with_residual),
                prologue=np.int64(prologue), prologue_relu=np.int64(prologue_relu))


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
    lowers the pool's select-and-scatter to index iotas and a scatter (docs/benchmarks.md, tenth session).
    """
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    call = jax.ffi.ffi_call(_target(POOL_GRAD_TARGET), jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            vmap_method="sequential")
    return call(x, dy, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh), sw=np.int64(sw), ph=np.int64(ph),
                pw=np.int64(pw))


def _affine_add_relu_reference(relu, y, mean, scale, shift, residual, rmean, rscale, rshift):
    out = (y - mean) * scale + shift + ((residual - rmean) * rscale + rshift)
    return jnp.maximum(out, 0.0) if relu else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _affine_add_relu(relu, *args):
    call = jax.ffi.ffi_call(_target(EPILOGUE_TARGET), jax.ShapeDtypeStruct(args[0].shape, jnp.float32),
                            vmap_method="sequential")
    return call(*args, relu=np.int64(relu))


def _affine_add_relu_fwd(relu, *args):
    return _affine_add_relu(relu, *args), args


def _affine_add_relu_bwd(relu, args, g):
    return jax.vjp(functools.partial(_affine_add_relu_reference, relu), *args)[1](g)


_affine_add_relu.defvjp(_affine_add_relu_fwd, _affine_add_relu_bwd)
