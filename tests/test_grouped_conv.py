"""Every grouped-conv implementation against an independent float64 numpy reference.

The reference is a direct convolution written with numpy loops over kernel taps, so it
shares no code with XLA; gradients are checked for L = sum(conv(x, w) * ct).
"""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import cpu
from resnext_jax.ops import CONV_IMPLS, conv2d
from resnext_jax.ops.grouped_conv import resolve_impl

# "auto" is one of these per backend; test_auto_resolution checks which.
IMPLS = [impl for impl in CONV_IMPLS if impl != "auto"]

# (name, x shape NHWC, kernel (kh, kw), out channels, groups, strides, padding)
CASES = [
    ("resnext-like", (2, 8, 8, 16), (3, 3), 16, 4, (1, 1), ((1, 1), (1, 1))),
    ("stride2-odd", (2, 9, 7, 8), (3, 3), 8, 2, (2, 2), ((1, 1), (1, 1))),
    ("groups1", (1, 6, 6, 5), (3, 3), 7, 1, (1, 1), ((1, 1), (1, 1))),
    ("depthwise-x2", (2, 7, 7, 6), (3, 3), 12, 6, (1, 1), ((1, 1), (1, 1))),
    ("nonsquare-asym", (1, 9, 8, 12), (3, 2), 6, 3, (2, 1), ((1, 1), (0, 1))),
    ("wide-out", (1, 5, 6, 8), (1, 3), 12, 4, (1, 2), ((0, 0), (1, 1))),
    ("no-pad", (2, 6, 6, 4), (3, 3), 8, 2, (1, 1), ((0, 0), (0, 0))),
    ("1x1-dense", (2, 6, 5, 8), (1, 1), 12, 1, (1, 1), ((0, 0), (0, 0))),
    ("1x1-stride2-odd", (2, 7, 7, 8), (1, 1), 6, 1, (2, 2), ((0, 0), (0, 0))),
    ("1x1-grouped-stride2", (1, 8, 6, 8), (1, 1), 8, 2, (2, 2), ((0, 0), (0, 0))),
    ("stem-7x7-stride2", (1, 13, 12, 3), (7, 7), 4, 1, (2, 2), ((3, 3), (3, 3))),
]


def reference_conv_and_grads(x, w, ct, strides, padding, groups):
    """float64 direct grouped conv, plus d(sum(y * ct)) / dx and / dw, in numpy."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    kh, kw, cin_g, out = w.shape
    out_g = out // groups
    sh, sw = strides
    xp = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    n, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = np.zeros((n, ho, wo, out))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for g in range(groups):
        cin, cout = slice(g * cin_g, (g + 1) * cin_g), slice(g * out_g, (g + 1) * out_g)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i, i + (ho - 1) * sh + 1, sh)
                cols = slice(j, j + (wo - 1) * sw + 1, sw)
                window = xp[:, rows, cols, cin]
                y[..., cout] += window @ w[i, j, :, cout]
                dxp[:, rows, cols, cin] += ct[..., cout] @ w[i, j, :, cout].T
                dw[i, j, :, cout] += np.einsum("nhwc,nhwo->co", window, ct[..., cout])
    dx = dxp[:, padding[0][0] : hp - padding[0][1], padding[1][0] : wp - padding[1][1]]
    return y, dx, dw


def _inputs(x_shape, kernel_hw, out, groups, strides, padding, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((*kernel_hw, x_shape[-1] // groups, out)).astype(np.float32)
    conv = lambda x, w: conv2d(x, w, strides=strides, padding=padding, groups=groups)
    y_shape = jax.eval_shape(conv, jnp.asarray(x), jnp.asarray(w)).shape
    ct = rng.standard_normal(y_shape).astype(np.float32)
    return x, w, ct


def _run(impl, x, w, ct, strides, padding, groups):
    conv = lambda x, w: conv2d(
        x, w, strides=strides, padding=padding, groups=groups, impl=impl, precision=jax.lax.Precision.HIGHEST
    )
    # One jit per case compiles faster than eager split's dozens of per-op dispatches.
    step = jax.jit(lambda x, w, ct: (lambda y, vjp: (y, *vjp(ct)))(*jax.vjp(conv, x, w)))
    return step(jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct, x.dtype))


def _assert_close(actual, expected, rtol, what):
    # Tolerance relative to the largest magnitude: the error of a sum of K products scales
    # with the terms, not with the (possibly cancelling) result.
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err <= rtol, f"{what}: max error {err:.2e} relative to max |ref|, allowed {rtol:.0e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(impl, case):
    """Outputs and both gradients within 1e-5 of float64 (f32 eps 1.2e-7 times sums of <~100 terms)."""
    _, x_shape, kernel_hw, out, groups, strides, padding = case
    x, w, ct = _inputs(x_shape, kernel_hw, out, groups, strides, padding)
    y_ref, dx_ref, dw_ref = reference_conv_and_grads(x, w, ct, strides, padding, groups)
    y, dx, dw = _run(impl, x, w, ct, strides, padding, groups)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    _assert_close(y, y_ref, 1e-5, f"{impl} output")
    _assert_close(dx, dx_ref, 1e-5, f"{impl} d/dx")
    _assert_close(dw, dw_ref, 1e-5, f"{impl} d/dw")


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_close_to_float32(impl):
    """bf16 in, bf16 out, within 2**-6 of the float64 result on the same (bf16-rounded) values.

    bf16 keeps 8 significant bits (unit roundoff 2**-9): rounding the output costs 2**-9, and
    XLA:CPU accumulates bf16 convs and dots in float32, so a 4x margin (2**-7 = 0.0078)
    suffices; 2**-6 leaves room for the bf16 rounding of intermediates such as the kernel
    expansion. A wrong group mapping gives errors of order 1.
    """
    _, x_shape, kernel_hw, out, groups, strides, padding = CASES[0]
    x, w, ct = _inputs(x_shape, kernel_hw, out, groups, strides, padding, seed=1)
    x, w, ct = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, w, ct))
    y_ref, dx_ref, dw_ref = reference_conv_and_grads(x, w, ct, strides, padding, groups)
    y, dx, dw = _run(impl, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), ct, strides, padding, groups)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for got, ref, what in ((y, y_ref, "output"), (dx, dx_ref, "d/dx"), (dw, dw_ref, "d/dw")):
        _assert_close(got, ref, 2.0**-6, f"{impl} bf16 {what}")


def test_reference_detects_wrong_group_mapping():
    """The check can fail: interleaved groups (channel c in group c % G) are rejected."""
    _, x_shape, kernel_hw, out, groups, strides, padding = CASES[0]
    x, w, ct = _inputs(x_shape, kernel_hw, out, groups, strides, padding)
    y_ref, _, _ = reference_conv_and_grads(x, w, ct, strides, padding, groups)
    cin_g = x_shape[-1] // groups
    interleaved = x.reshape(*x.shape[:3], cin_g, groups).swapaxes(-1, -2).reshape(x.shape)
    y, _, _ = _run("split", interleaved, w, ct, strides, padding, groups)
    with pytest.raises(AssertionError):
        _assert_close(y, y_ref, 1e-5, "interleaved")


@pytest.mark.parametrize(
    "channels, kernel_in, out, groups, match",
    [
        (16, 4, 16, 3, "groups=3"),  # 16 channels do not split into 3 groups
        (16, 4, 18, 4, "O % groups"),  # 18 outputs do not split into 4 groups
        (16, 8, 16, 4, r"kernel \(kh, kw, 4, O\)"),  # kernel in-channels must be C // groups
        (16, 4, 16, 0, "groups >= 1"),
    ],
)
def test_bad_groups_raise_clear_error(channels, kernel_in, out, groups, match):
    x = jnp.zeros((1, 4, 4, channels))
    w = jnp.zeros((3, 3, kernel_in, out))
    with pytest.raises(ValueError, match=match):
        conv2d(x, w, padding=((1, 1), (1, 1)), groups=groups, impl="split")


def test_unknown_impl_lists_choices():
    with pytest.raises(ValueError, match="not one of"):
        conv2d(jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 1, 4)), groups=4, impl="cudnn")


def test_auto_resolution():
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_impl("auto", groups=32) == ("split" if on_cpu else "xla")
    assert resolve_impl("auto", groups=1, kernel_hw=(3, 3)) == "xla"
    assert resolve_impl("auto", groups=1, kernel_hw=(1, 1)) == ("gemm" if on_cpu else "xla")
    # Grouped implementations of a dense conv are all the same single conv; 'gemm' is honoured.
    assert resolve_impl("split", groups=1, kernel_hw=(1, 1)) == "xla"
    assert resolve_impl("gemm", groups=1, kernel_hw=(3, 3)) == "gemm"


def test_auto_forward_only_narrow_groups_use_chunks():
    """Forward-only 'auto' on narrow groups (<= 8 channels) merges 4 groups per block-diagonal chunk on CPU."""
    on_cpu = jax.default_backend() == "cpu"
    assert resolve_impl("auto", 32, (3, 3), channels=256, forward_only=True) == ("chunked" if on_cpu else "xla")
    assert resolve_impl("auto", 32, (3, 3), channels=512, forward_only=True) == ("split" if on_cpu else "xla")
    assert resolve_impl("auto", 32, (3, 3), channels=128) == ("split" if on_cpu else "xla")
    # And the chunks it builds compute the grouped conv: 8 groups of 2 channels -> 2 chunks of 4 groups.
    strides, padding, groups = (2, 1), ((1, 1), (1, 0)), 8
    x, w, ct = _inputs((2, 7, 6, 16), (3, 3), 24, groups, strides, padding)
    y_ref, _, _ = reference_conv_and_grads(x, w, ct, strides, padding, groups)
    y = conv2d(
        jnp.asarray(x),
        jnp.asarray(w),
        strides=strides,
        padding=padding,
        groups=groups,
        impl="auto",
        forward_only=True,
        precision=jax.lax.Precision.HIGHEST,
    )
    _assert_close(y, y_ref, 1e-5, "auto forward-only output")


# ---------------------------------------------------------------------------------------- the native kernel
def _native_prerequisites() -> bool:
    import platform

    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and {"avx2", "fma"} <= cpu.cpu_flags()
        and bool(cpu.compiler())
        and jax.default_backend() == "cpu"
        and os.environ.get(cpu.ISA_ENV, "") in ("", "avx2", "avx512")
    )


def test_native_builds_wherever_it_can():
    """With an x86-64 AVX2 (or AVX-512) CPU and a C++ compiler the kernel must build and load, for the best
    instruction set the CPU has; otherwise the reason names what is missing."""
    if _native_prerequisites():
        assert cpu.available(), cpu.unavailable_reason()
        flags = cpu.cpu_flags()
        best = "avx512" if {"avx512f", "avx512vl"} <= flags else "avx2"
        assert cpu.isa() == os.environ.get(cpu.ISA_ENV, best)
    else:
        assert not cpu.available() and cpu.unavailable_reason()


def test_native_instruction_set_choice():
    """The build follows the CPU's flags, and `RESNEXT_JAX_NATIVE_ISA` can only pick one the CPU runs."""
    avx512 = {"avx2", "fma", "avx512f", "avx512vl"}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert cpu.select_isa({}, avx512)[0] is None
        return
    assert cpu.select_isa({}, avx512) == ("avx512", "the best this CPU has")
    assert cpu.select_isa({}, {"avx2", "fma", "avx512f"})[0] == "avx2"  # AVX-512F without VL
    assert cpu.select_isa({cpu.ISA_ENV: "avx2"}, avx512)[0] == "avx2"
    isa, why = cpu.select_isa({}, {"avx", "sse4_2"})
    assert isa is None and "avx2, fma not in /proc/cpuinfo" in why
    isa, why = cpu.select_isa({cpu.ISA_ENV: "avx512"}, {"avx2", "fma"})
    assert isa is None and "lacks avx512f, avx512vl" in why and "unset it" in why
    isa, why = cpu.select_isa({cpu.ISA_ENV: "sse"}, avx512)
    assert isa is None and "'sse' is not one of ['avx2', 'avx512']" in why


@pytest.mark.slow
def test_native_avx2_build_on_an_avx512_cpu():
    """The default run tests the best build the CPU has; on an AVX-512 CPU, this runs the native kernel and
    epilogue tests again with the AVX2 build (AMD Zen and older Intel CPUs run that one)."""
    if cpu.isa() != "avx512" or os.environ.get(cpu.ISA_ENV):
        pytest.skip(f"the default run already tests the only build this CPU runs ({cpu.isa()})")
    env = {**os.environ, cpu.ISA_ENV: "avx2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_grouped_conv.py",
            "tests/test_batch_norm.py",
            "-k",
            "native",
        ],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("isa", sorted(cpu.ISAS))
def test_every_instruction_set_build_compiles(isa, tmp_path, monkeypatch):
    """Both builds compile wherever there is a compiler, whatever this CPU runs: a CPU without AVX-512 runs
    only the AVX2 build, and a change that breaks the other (an AVX2-only helper named outside its `#if`)
    would otherwise first fail on a user's machine. Compiled, not loaded or run."""
    if not cpu.compiler():
        pytest.skip("no C++ compiler: test_native_builds_wherever_it_can checks the reason instead")
    monkeypatch.setenv("RESNEXT_JAX_CACHE", str(tmp_path))
    path = cpu.build._build(cpu.compiler(), isa)
    assert os.path.getsize(path) > 0 and f"-{isa}-" in os.path.basename(path)


# (name, x shape NHWC, kernel (kh, kw), groups, strides, padding): every compiled group width, strides,
# odd and non-square sizes, asymmetric padding, rows shorter than a register block of 8 pixels.
NATIVE_CASES = [
    ("cg4-resnext", (2, 9, 11, 64), (3, 3), 16, (1, 1), ((1, 1), (1, 1))),
    ("cg4-stride2-odd", (2, 9, 7, 32), (3, 3), 8, (2, 2), ((1, 1), (1, 1))),
    ("cg8-stride21-asym", (1, 10, 13, 64), (3, 3), 8, (2, 1), ((1, 0), (0, 2))),
    ("cg8-rows-of-28", (1, 4, 28, 32), (3, 3), 4, (1, 1), ((1, 1), (1, 1))),  # 14-pixel blocks (AVX2)
    ("cg16-nonsquare", (2, 6, 19, 64), (3, 2), 4, (1, 2), ((1, 1), (0, 1))),
    ("cg32-nopad", (1, 7, 7, 64), (3, 3), 2, (1, 1), ((0, 0), (0, 0))),
    ("cg1-depthwise", (1, 5, 6, 16), (3, 3), 16, (1, 1), ((1, 1), (1, 1))),
    ("cg2", (1, 5, 9, 32), (3, 3), 16, (2, 2), ((1, 1), (1, 1))),
    # Rows long enough for 8-pixel blocks clear of the padding (the AVX2 narrow forward's interior path), and
    # (width 24) a block whose last tap would read exactly one past the row.
    ("cg4-interior-blocks", (1, 5, 24, 32), (3, 3), 8, (1, 1), ((1, 1), (1, 1))),
    ("cg2-interior-stride2", (1, 6, 40, 32), (3, 3), 16, (2, 2), ((1, 0), (2, 1))),
    ("cg1-interior-5x5", (1, 6, 30, 16), (5, 5), 16, (1, 1), ((2, 2), (2, 2))),
    # The same for the AVX2 wide groups' 7-pixel blocks: interior at stride 2, and one ending at the row's end.
    ("cg8-interior-stride2", (1, 5, 34, 32), (3, 3), 4, (2, 2), ((1, 1), (1, 1))),
    ("cg16-interior-edge", (1, 4, 14, 32), (3, 3), 2, (1, 1), ((1, 1), (1, 1))),
    # AVX2 blocks of 2 vectors x 6 pixels (16k-channel groups) and 3 x 4 (24-channel groups), with tails.
    ("cg16-tails-of-5", (1, 4, 17, 32), (3, 3), 2, (1, 1), ((1, 1), (1, 1))),
    ("cg24-tails-of-3", (1, 5, 11, 48), (3, 3), 2, (1, 1), ((1, 1), (1, 1))),
    ("cg24-stride2-tail-of-1", (1, 6, 17, 72), (3, 3), 3, (2, 2), ((1, 1), (1, 1))),
    # AVX2 8-channel groups, 3-wide kernel rows at column stride 1: blocks of 10 output pixels, a tail of 9.
    ("cg8-tail-of-9", (1, 5, 19, 16), (3, 3), 2, (1, 1), ((1, 1), (1, 1))),
    # And for groups of 1, 2 and 4 channels (12-pixel blocks; cg4-resnext has a tail of 11).
    ("cg2-stride1-tail-of-7", (1, 4, 19, 32), (3, 3), 16, (1, 1), ((1, 1), (1, 1))),
    ("cg48-1x1", (1, 4, 5, 96), (1, 1), 2, (1, 1), ((0, 0), (0, 0))),
    ("cg64-5x5", (1, 8, 8, 128), (5, 5), 2, (1, 1), ((2, 2), (2, 2))),
    ("cg8-1x1-overpadded", (1, 5, 4, 32), (1, 1), 4, (1, 1), ((1, 2), (2, 0))),
    ("cg32-stride3-7x7", (2, 11, 10, 64), (7, 7), 2, (3, 3), ((3, 3), (3, 2))),
    ("dense-64-stride2", (2, 9, 10, 64), (3, 3), 1, (2, 2), ((1, 1), (1, 1))),
    ("dense-48-rows-of-15", (1, 5, 15, 48), (3, 3), 1, (1, 1), ((1, 1), (1, 1))),
    # Over 14x14 outputs, stride 1: the AVX2 build's dense kernel gradient stays native (smaller or strided
    # ones go by matmuls, `native_kernel_grad_by_taps`).
    ("dense-16-15x15", (1, 15, 15, 16), (3, 3), 1, (1, 1), ((1, 1), (1, 1))),
    ("cg80-stride12", (1, 6, 9, 160), (3, 3), 2, (1, 2), ((1, 1), (1, 1))),
    # Groups of an odd multiple of 8 channels (8-lane vectors): RegNet's 24, 8 with channels not a multiple of 16.
    ("cg24-regnet-stride2", (2, 9, 8, 72), (3, 3), 3, (2, 2), ((1, 1), (1, 1))),
    ("cg8-120-channels", (1, 6, 7, 120), (3, 3), 15, (1, 1), ((1, 1), (1, 1))),
    ("cg40-stride21", (1, 7, 6, 80), (3, 3), 2, (2, 1), ((1, 1), (1, 1))),
    # A kernel over 1 MiB: the forward's work goes by channel block, not by row.
    ("dense-192-big-kernel", (2, 4, 5, 192), (3, 3), 1, (1, 1), ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c[0] for c in NATIVE_CASES])
def test_native_matches_float64_reference(case):
    """The C++ kernels' output, input gradient and kernel gradient within 1e-5 of float64, also through
    the models' `conv2d_canonical_grad`, and the compiled programs really call the kernels; where they
    cannot be built, asking for them says why."""
    _, x_shape, kernel_hw, groups, strides, padding = case
    x, w, ct = _inputs(x_shape, kernel_hw, x_shape[-1], groups, strides, padding, seed=2)
    if not _native_prerequisites():
        with pytest.raises(ValueError, match="'native' is unavailable"):
            _run("native", x, w, ct, strides, padding, groups)
        return
    assert cpu.supports(x.shape, w.shape, x.dtype, groups)
    conv = jax.jit(lambda x, w: conv2d(x, w, strides=strides, padding=padding, groups=groups, impl="native"))
    assert cpu.TARGET in conv.lower(jnp.asarray(x), jnp.asarray(w)).as_text()
    y_ref, dx_ref, dw_ref = reference_conv_and_grads(x, w, ct, strides, padding, groups)
    y, dx, dw = _run("native", x, w, ct, strides, padding, groups)
    _assert_close(y, y_ref, 1e-5, "native output")
    _assert_close(dx, dx_ref, 1e-5, "native d/dx")
    _assert_close(dw, dw_ref, 1e-5, "native d/dw")
    from resnext_jax.ops.conv_grad import conv2d_canonical_grad

    canonical = lambda x, w: conv2d_canonical_grad(x, w, strides, padding, groups, "native")
    grads = jax.jit(lambda x, w, ct: jax.vjp(canonical, x, w)[1](ct))
    text = grads.lower(jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct)).as_text()
    assert cpu.TARGET in text
    from resnext_jax.ops.grouped_conv import native_kernel_grad_by_taps

    by_taps = native_kernel_grad_by_taps(w.shape, strides, ct.shape[1:3])
    assert (cpu.GRAD_TARGET in text) != by_taps
    assert by_taps == (cpu.isa() == "avx2" and groups == 1 and (max(strides) > 1 or ct.shape[1] * ct.shape[2] <= 196))
    dx, dw = grads(jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct))
    _assert_close(dx, dx_ref, 1e-5, "canonical native d/dx")
    _assert_close(dw, dw_ref, 1e-5, "canonical native d/dw")


# (name, x shape NHWC, kernel (kh, kw), out channels, strides, padding) for `cpu.few_channel_conv`: the
# ResNet and RegNet stems, 1 to 4 input channels, and output widths leaving each tail of a 6-pixel register
# block (21, 17, 7, 4, 2 and 12 pixels: 3, 5, 1, 4, 2 and 0 left over).
FEW_CHANNEL_CASES = [
    ("resnet-stem-odd", (2, 37, 41, 3), (7, 7), 64, (2, 2), ((3, 3), (3, 3))),
    ("regnet-stem", (1, 33, 34, 3), (3, 3), 32, (2, 2), ((1, 1), (1, 1))),
    ("one-channel", (2, 6, 7, 1), (3, 3), 16, (1, 1), ((1, 1), (1, 1))),
    ("four-channels-asym", (1, 5, 8, 4), (5, 3), 48, (1, 2), ((2, 1), (1, 1))),
    ("two-channels-unpadded-width", (1, 6, 4, 2), (3, 3), 16, (1, 1), ((0, 1), (0, 0))),
    ("stride3", (1, 9, 36, 3), (4, 4), 32, (3, 3), ((1, 2), (2, 1))),
]


@pytest.mark.parametrize("case", FEW_CHANNEL_CASES, ids=[c[0] for c in FEW_CHANNEL_CASES])
def test_few_channel_conv_matches_float64_reference(case):
    """Dense convs with at most 4 input channels (the stems): the forward `conv2d(forward_only=True)` runs,
    by the native `few_channel_conv` where the kernels run, within 1e-5 of float64, and so do the models'
    `conv2d_canonical_grad` output and gradients around it."""
    _, x_shape, kernel_hw, out, strides, padding = case
    x, w, ct = _inputs(x_shape, kernel_hw, out, 1, strides, padding, seed=3)
    y_ref, dx_ref, dw_ref = reference_conv_and_grads(x, w, ct, strides, padding, 1)
    forward = jax.jit(lambda x, w: conv2d(x, w, strides=strides, padding=padding, forward_only=True))
    text = forward.lower(jnp.asarray(x), jnp.asarray(w)).as_text()
    assert (cpu.FEW_CHANNEL_CONV_TARGET in text) == (_native_prerequisites() and cpu.available())
    assert cpu.supports_few_channels(x.shape, w.shape, x.dtype, 1)
    _assert_close(forward(jnp.asarray(x), jnp.asarray(w)), y_ref, 1e-5, "few-channel output")
    from resnext_jax.ops.conv_grad import conv2d_canonical_grad

    canonical = lambda x, w: conv2d_canonical_grad(x, w, strides, padding, 1, "auto")
    step = jax.jit(lambda x, w, ct: (lambda y, vjp: (y, *vjp(ct)))(*jax.vjp(canonical, x, w)))
    y, dx, dw = step(jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct))
    _assert_close(y, y_ref, 1e-5, "canonical few-channel output")
    _assert_close(dx, dx_ref, 1e-5, "canonical few-channel d/dx")
    _assert_close(dw, dw_ref, 1e-5, "canonical few-channel d/dw")


def test_few_channel_conv_only_where_it_applies():
    assert not cpu.supports_few_channels((8, 224, 224, 3), (7, 7, 3, 64), jnp.bfloat16, 1)
    assert not cpu.supports_few_channels((8, 56, 56, 8), (3, 3, 8, 64), jnp.float32, 1)  # 8 channels
    assert not cpu.supports_few_channels((8, 224, 224, 3), (7, 7, 3, 24), jnp.float32, 1)  # 24 outputs
    assert not cpu.supports_few_channels((8, 224, 224, 4), (7, 7, 2, 64), jnp.float32, 2)  # grouped
    # Not without forward_only (it has no VJP of its own), nor for an explicit 'xla'.
    x, w = jnp.zeros((1, 16, 16, 3)), jnp.zeros((7, 7, 3, 64))
    for kwargs in ({}, {"impl": "xla", "forward_only": True}):
        text = (
            jax.jit(lambda x, w: conv2d(x, w, strides=(2, 2), padding=((3, 3), (3, 3)), **kwargs)).lower(x, w).as_text()
        )
        assert cpu.FEW_CHANNEL_CONV_TARGET not in text


def test_auto_picks_native_where_it_runs():
    supported = cpu.supports((8, 56, 56, 128), (3, 3, 4, 128), jnp.float32, 32)
    assert supported and not cpu.supports((8, 56, 56, 128), (3, 3, 4, 128), jnp.bfloat16, 32)
    assert cpu.supports((8, 28, 28, 120), (3, 3, 24, 120), jnp.float32, 5)  # RegNet's 24-channel groups
    assert not cpu.supports((8, 28, 28, 60), (3, 3, 12, 60), jnp.float32, 5)  # 12-channel groups
    expected = "native" if cpu.available() else ("split" if jax.default_backend() == "cpu" else "xla")
    assert resolve_impl("auto", 32, (3, 3), channels=128, native_shape=True) == expected
    # Dense 3x3 convs too (ResNet's), but not 1x1 ones: those are single matmuls ('gemm').
    assert cpu.supports((8, 56, 56, 64), (3, 3, 64, 64), jnp.float32, 1)
    assert resolve_impl("auto", 1, (3, 3), channels=64, native_shape=True) == ("native" if cpu.available() else "xla")
    assert resolve_impl("auto", 1, (1, 1), channels=64, native_shape=True) == (
        "gemm" if jax.default_backend() == "cpu" else "xla"
    )
    # An explicit 'native' on a conv the kernel does not support is 'split' ('xla' when dense).
    if cpu.available():
        assert resolve_impl("native", 5, (3, 3), channels=60, native_shape=False) == "split"
        assert resolve_impl("native", 1, (3, 3), channels=60, native_shape=False) == "xla"


def test_native_unavailable_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu.build, "_load", lambda: (False, "no C++ compiler found: install g++ (or set CXX)"))
    with pytest.raises(ValueError, match="unavailable: no C\\+\\+ compiler found.*impl='auto'"):
        conv2d(jnp.zeros((1, 4, 4, 16)), jnp.zeros((3, 3, 4, 16)), groups=4, impl="native")
    # 'auto' still works, without it.
    y = conv2d(jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 4, 16)), padding=((1, 1), (1, 1)), groups=4)
    assert float(y[0, 1, 1, 0]) == 36.0  # 3x3 taps x 4 channels of ones
