"""NaN and Inf go through every native CPU kernel, and through whole models, as they go through XLA.

A kernel that turns NaN into a number (a ReLU written `max(x, 0)` with MAXPS returns 0 for NaN) blinds the
training loop's non-finite-loss guard and returns finite logits for a broken input. Each kernel is compared
with the same computation in plain XLA on inputs holding NaN and Inf: the non-finite entries must sit in the
same places and the finite ones must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import cpu

needs_native = pytest.mark.skipif(not cpu.available(), reason=f"native kernels: {cpu.unavailable_reason()}")
pytestmark = needs_native

HIGHEST = jax.lax.Precision.HIGHEST


def _poison(a: np.ndarray, seed: int, values=(np.nan, np.inf, -np.inf)) -> np.ndarray:
    """`a` with a few entries set to each of `values`."""
    rng = np.random.default_rng(seed)
    a = a.copy()
    flat = a.reshape(-1)
    for value in values:
        flat[rng.choice(flat.size, size=2, replace=False)] = value
    return a


def _assert_same(got, expected):
    """NaN where `expected` has NaN, the same infinity or NaN where it has an infinity, and close where both are
    finite: a non-finite value is never lost."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    assert np.isnan(expected).any() or np.isinf(expected).any(), "the reference has no non-finite value to check"
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got[nan]), True, err_msg="a NaN was lost")
    for inf in (np.inf, -np.inf):
        at = expected == inf
        np.testing.assert_array_equal((got[at] == inf) | np.isnan(got[at]), True, err_msg=f"a {inf} was lost")
    # Extra non-finite values are allowed near the poisoned ones: a kernel block that multiplies a neighbouring
    # Inf by a zero weight gives NaN (XLA:CPU's conv spreads them over whole tiles). They stay rare.
    finite = np.isfinite(expected)
    assert (~np.isfinite(got[finite])).sum() <= 0.05 * finite.sum(), "non-finite values far beyond the reference's"
    finite &= np.isfinite(got)
    scale = max(1.0, float(np.abs(expected[finite]).max())) if finite.any() else 1.0
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4 * scale)


# (x shape NHWC, groups): a ResNeXt group of 8 channels, a narrow group, and a dense 3x3 conv.
CONV_CASES = [((2, 9, 9, 32), 4), ((1, 8, 8, 32), 16), ((1, 7, 7, 16), 1)]


@pytest.mark.parametrize("x_shape,groups", CONV_CASES)
@pytest.mark.parametrize("where", ["input", "kernel", "output-gradient"])
def test_grouped_conv_forward_and_gradients_keep_nonfinite(x_shape, groups, where):
    """Against test_grouped_conv's float64 direct conv, not XLA's: XLA:CPU's own conv spreads one Inf pixel
    into NaN over whole tiles of outputs that never read it. Padding is skipped natively, never multiplied,
    so where a non-finite value meets only padding the kernels give a number and XLA `0 * Inf`: the kernel
    case poisons the centre tap and the output-gradient case the interior, which never meet padding."""
    from test_grouped_conv import reference_conv_and_grads

    rng = np.random.default_rng(0)
    channels = x_shape[-1]
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((3, 3, channels // groups, channels)).astype(np.float32)
    strides, padding = (1, 1), ((1, 1), (1, 1))
    dy = rng.standard_normal((*x_shape[:3], channels)).astype(np.float32)
    if where == "input":
        x = _poison(x, 1)
    elif where == "kernel":
        w[1, 1] = _poison(w[1, 1], 1)
    else:  # the border's outputs read padding, which the kernels skip where XLA computes 0 * Inf
        dy[:, 1:-1, 1:-1] = _poison(dy[:, 1:-1, 1:-1], 1)
    with np.errstate(invalid="ignore", over="ignore"):
        y, dx, dw = reference_conv_and_grads(x, w, dy, strides, padding, groups)
    x, w, dy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    if where != "output-gradient":
        _assert_same(cpu.grouped_conv_forward(x, w, strides, padding), y)
    if where != "input":
        _assert_same(cpu.grouped_conv_input_grad(dy, w, x_shape[1:3], strides, padding), dx)
    if where != "kernel":
        _assert_same(cpu.grouped_conv_kernel_grad(x, dy, w.shape, strides, padding), dw)


@pytest.mark.parametrize("relu", [True, False])
def test_affine_add_relu_keeps_nonfinite(relu):
    rng = np.random.default_rng(3)
    shape = (2, 5, 5, 24)
    y, residual = (_poison(rng.standard_normal(shape).astype(np.float32), seed) for seed in (4, 5))
    mean, scale, shift = (rng.standard_normal(24).astype(np.float32) for _ in range(3))
    mean[3] = np.nan  # NaN running statistics poison a whole channel
    scale[7] = np.inf
    args = [jnp.asarray(a) for a in (y, mean, scale, shift, residual)]
    got = cpu.affine_add_relu(*args, relu=relu)
    out = (args[0] - args[1]) * args[2] + args[3] + args[4]
    _assert_same(got, jnp.maximum(out, 0.0) if relu else out)


@pytest.mark.parametrize("masked", [False, True])
def test_channel_sums_keep_nonfinite(masked):
    rng = np.random.default_rng(6)
    a = _poison(rng.standard_normal((4, 6, 6, 16)).astype(np.float32), 7)
    b = rng.standard_normal(a.shape).astype(np.float32)
    b[0, 0, 0, 5] = np.nan
    shift = rng.standard_normal(16).astype(np.float32)
    mask = rng.standard_normal(a.shape).astype(np.float32) if masked else None
    got = cpu.channel_sums(
        jnp.asarray(a), jnp.asarray(b), jnp.asarray(shift), None if mask is None else jnp.asarray(mask)
    )
    a64 = np.where(mask > 0, a, 0.0) if masked else a.astype(np.float64)
    with np.errstate(invalid="ignore"):
        expected = (a64.sum(axis=(0, 1, 2)), (a64 * (b.astype(np.float64) - shift)).sum(axis=(0, 1, 2)))
    for g, e in zip(got, expected):
        _assert_same(g, e)


def test_max_pool_gradient_reaches_nonfinite_inputs():
    """The gradient of a window holding NaN goes to its first NaN, which the forward pool passed on; with
    Inf the first Inf wins as any maximum does (XLA's select-and-scatter agrees there)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 9, 9, 8)).astype(np.float32)
    x[0, 4, 4, 2] = np.inf
    x[0, 3, 5, 5] = np.nan
    dy = rng.standard_normal((1, 5, 5, 8)).astype(np.float32)

    def pool(x):
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )

    got = np.asarray(cpu.max_pool_grad(jnp.asarray(x), jnp.asarray(dy), (3, 3), (2, 2), (1, 1)))
    assert np.isnan(np.asarray(pool(jnp.asarray(x)))[0, :, :, 5]).sum() == 4  # the NaN sits in 4 windows
    # Every window's gradient lands somewhere: per channel, the sums agree with dy's.
    np.testing.assert_allclose(got.sum(axis=(0, 1, 2)), dy.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    # Output (i, j) pools input rows 2i-1..2i+1 and columns 2j-1..2j+1: all 4 windows over the NaN give it theirs.
    windows = [(i, j) for i in range(5) for j in range(5) if abs(2 * i - 3) <= 1 and abs(2 * j - 5) <= 1]
    np.testing.assert_allclose(got[0, 3, 5, 5], sum(dy[0, i, j, 5] for i, j in windows), rtol=1e-5)
    # Inf: the same gradient as XLA's.
    clean = np.where(np.isnan(x), 0.0, x).astype(np.float32)
    expected = jax.vjp(pool, jnp.asarray(clean))[1](jnp.asarray(dy))[0]
    got_inf = cpu.max_pool_grad(jnp.asarray(clean), jnp.asarray(dy), (3, 3), (2, 2), (1, 1))
    np.testing.assert_allclose(got_inf[..., 2], expected[..., 2], rtol=1e-6)
    # NaN output gradients reach the inputs that won.
    dy_nan = _poison(dy, 9, values=(np.nan,))
    _assert_same(
        cpu.max_pool_grad(jnp.asarray(clean), jnp.asarray(dy_nan), (3, 3), (2, 2), (1, 1)),
        jax.vjp(pool, jnp.asarray(clean))[1](jnp.asarray(dy_nan))[0],
    )


def test_few_channel_conv_and_kernel_grad_keep_nonfinite():
    rng = np.random.default_rng(10)
    x = _poison(rng.standard_normal((1, 17, 15, 3)).astype(np.float32), 11)
    w = rng.standard_normal((7, 7, 3, 16)).astype(np.float32)
    strides, padding = (2, 2), ((3, 3), (3, 3))
    expected = jax.lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(w), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST
    )
    _assert_same(cpu.few_channel_conv(jnp.asarray(x), jnp.asarray(w), strides, padding), expected)

    xs = _poison(rng.standard_normal((2, 8, 8, 12)).astype(np.float32), 12)
    dy = rng.standard_normal((2, 6, 6, 32)).astype(np.float32)
    got = cpu.few_channel_kernel_grad(jnp.asarray(xs), jnp.asarray(dy), (3, 3))
    windows = np.stack([np.stack([xs[:, p : p + 6, q : q + 6] for q in range(3)]) for p in range(3)])
    with np.errstate(invalid="ignore"):
        expected = np.einsum("pqnyxi,nyxo->pqio", windows.astype(np.float64), dy.astype(np.float64))
    _assert_same(got, expected)


@pytest.mark.parametrize("prologue_relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matmul_affine_keeps_nonfinite(prologue_relu, with_residual):
    rng = np.random.default_rng(13)
    m, k, n = 13, 40, 24
    a = rng.standard_normal((m, k)).astype(np.float32)
    a[[2, 11]] = _poison(a[[2, 11]], 14)  # two rows: the others stay finite
    b = rng.standard_normal((k, n)).astype(np.float32)
    scale, shift = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    shift[5] = np.nan  # NaN batch-norm statistics fold into the shift
    a_scale, a_shift = rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    residual = rng.standard_normal((m, n)).astype(np.float32) if with_residual else None
    if with_residual:
        residual[6, 3], residual[7, 4] = np.nan, -np.inf
    args = dict(
        residual=None if residual is None else jnp.asarray(residual),
        relu=True,
        prologue=(jnp.asarray(a_scale), jnp.asarray(a_shift)),
        prologue_relu=prologue_relu,
    )
    got = cpu.matmul_affine(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale), jnp.asarray(shift), **args)
    expected = cpu.kernels._matmul_affine_reference(
        True,
        with_residual,
        True,
        prologue_relu,
        jnp.asarray(a),
        jnp.asarray(b),
        jnp.asarray(scale),
        jnp.asarray(shift),
        args["residual"],
        jnp.asarray(a_scale),
        jnp.asarray(a_shift),
    )
    _assert_same(got, expected)


MODELS = [
    pytest.param(
        "resnext50_32x4d", dict(stage_sizes=(1, 1, 1, 1), num_filters=16), id="resnext50_32x4d", marks=pytest.mark.slow
    ),
    pytest.param("resnet18", dict(stage_sizes=(1, 1, 1, 1)), id="resnet18"),
    pytest.param("regnet_y_400mf", dict(depth=4), id="regnet_y_400mf", marks=pytest.mark.slow),
]


def _model_pair(name, kwargs):
    import resnext_jax

    return tuple(resnext_jax.create_model(name, num_classes=5, conv_impl=impl, **kwargs) for impl in ("auto", "xla"))


@pytest.mark.parametrize("name,kwargs", MODELS)
@pytest.mark.parametrize(
    "force_matmul", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["build-default", "matmul"]
)
def test_models_return_nan_logits_for_a_nan_pixel_or_nan_statistics(name, kwargs, force_matmul, monkeypatch):
    """One NaN pixel makes that image's logits NaN and leaves the others; NaN running statistics make every
    logit NaN; an Inf pixel gives what XLA gives. At inference, on every native path."""
    if force_matmul:
        monkeypatch.setattr(cpu.kernels, "MATMUL_ISAS", (cpu.isa(),))
    fast, plain = _model_pair(name, kwargs)
    images = np.array(jax.random.normal(jax.random.key(1), (3, 40, 40, 3)))
    variables = jax.jit(lambda: plain.init(jax.random.key(0), jnp.asarray(images), train=False))()
    run_fast = jax.jit(lambda v, x: fast.apply(v, x, train=False))
    run_plain = jax.jit(lambda v, x: plain.apply(v, x, train=False))

    poisoned = images.copy()
    poisoned[1, 20, 13, 0] = np.nan
    poisoned[2, 3, 3, 1] = np.inf
    got, expected = run_fast(variables, poisoned), run_plain(variables, poisoned)
    assert np.isnan(np.asarray(expected)[1]).all()
    _assert_same(got, expected)

    stats = jax.tree_util.tree_map(np.array, variables["batch_stats"])
    first = sorted(stats)[0]
    leaf = jax.tree_util.tree_leaves(stats[first])[0]
    leaf[..., 0] = np.nan
    bad = {**variables, "batch_stats": stats}
    got, expected = run_fast(bad, images), run_plain(bad, images)
    assert np.isnan(np.asarray(expected)).all()
    _assert_same(got, expected)


@pytest.mark.parametrize("name,kwargs", MODELS[:2])
def test_train_step_loss_and_gradients_are_nan_for_a_nan_pixel(name, kwargs):
    """In training (batch statistics, the native backward kernels) one NaN pixel makes the loss NaN, as it does
    in plain XLA, so the non-finite-loss guard sees it."""
    fast, plain = _model_pair(name, kwargs)
    images = np.array(jax.random.normal(jax.random.key(1), (2, 40, 40, 3)))
    images[0, 5, 5, 2] = np.nan
    labels = jnp.array([1, 3])
    variables = jax.jit(lambda: plain.init(jax.random.key(0), jnp.asarray(images[1:]), train=False))()

    def loss_and_grad(model):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (loss_fast, grads_fast), (loss_plain, grads_plain) = loss_and_grad(fast), loss_and_grad(plain)
    assert np.isnan(loss_plain) and np.isnan(loss_fast)
    for g_fast, g_plain in zip(jax.tree_util.tree_leaves(grads_fast), jax.tree_util.tree_leaves(grads_plain)):
        np.testing.assert_array_equal(np.isfinite(g_fast).all(), np.isfinite(g_plain).all())
