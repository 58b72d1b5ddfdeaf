"""Model options, feature outputs and the registry (the torchvision parity lives in test_convert.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnext_jax
from resnext_jax.models import DropPath, drop_path_rates
from resnext_jax.ops.pool import max_pool_3x3s2

TINY = dict(stage_sizes=(1, 1, 1, 1), num_filters=16, cardinality=4, bottleneck_width=8, num_classes=7)


def tiny(**overrides):
    return resnext_jax.create_model("resnext50_32x4d", **{**TINY, **overrides})


def init(model, size=32, batch=2):
    # jit: one compile is far cheaper than dispatching (and compiling) every op eagerly.
    return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=False))()


def apply(model, variables, x, **kwargs):
    """`model.apply` as one compiled program: eager, every op of the network is compiled and dispatched alone."""
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def images(batch=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def train_grads(model, variables, x, seed=1):
    def loss(params):
        logits, _ = model.apply(
            {**variables, "params": params},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    return jax.jit(jax.grad(loss))(variables["params"])


def test_unknown_name_lists_closest():
    with pytest.raises(ValueError, match="resnext50_32x4d"):
        resnext_jax.create_model("resnext50_32x4")


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="drop_path_rate"):
        resnext_jax.create_model("resnet18", drop_path=0.1)


def test_model_info_presets():
    assert resnext_jax.model_info("resnet50").resize_v1 == 256
    assert resnext_jax.model_info("resnet50").resize_v2 == 232
    assert resnext_jax.model_info("resnext101_64x4d").resize_v1 is None
    assert resnext_jax.model_info("resnet18").mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "regnet_y_400mf"])
def test_feature_shapes(name):
    model = resnext_jax.create_model(name, num_classes=5)
    variables = jax.eval_shape(lambda: init(model, 64, 1))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 64, 96, 3)), return_features=True), variables)
    specs = model.stage_specs()
    for stage, stride in enumerate([4, 8, 16, 32]):
        assert out[f"stage{stage + 1}"].shape == (2, 64 // stride, 96 // stride, specs[stage]["out_channels"])
    assert out["pre_logits"].shape == (2, specs[-1]["out_channels"])
    assert out["logits"].shape == (2, 5)


@pytest.mark.slow  # 9-21 s: full-size models; CI runs it
def test_features_agree_with_logits():
    model = tiny()
    variables = init(model)
    out = apply(model, variables, images(), return_features=True)
    head = variables["params"]["fc"]
    np.testing.assert_allclose(out["pre_logits"] @ head["kernel"] + head["bias"], out["logits"], atol=1e-5)
    np.testing.assert_allclose(out["pre_logits"], out["stage4"].mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(apply(model, variables, images()), out["logits"])


@pytest.mark.slow  # 8-15 s of compiles; keeps the fast subset near 5 minutes; CI runs it
def test_small_stem_keeps_resolution():
    model = tiny(small_stem=True)
    out = jax.eval_shape(lambda: model.apply(init(model), jnp.zeros((1, 32, 32, 3)), return_features=True))
    assert [out[f"stage{i}"].shape[1] for i in (1, 2, 3, 4)] == [32, 16, 8, 4]
    assert "conv1" in init(model)["params"] and init(model)["params"]["conv1"]["kernel"].shape[:2] == (3, 3)


def test_grouped_kernel_layout():
    params = init(tiny())["params"]
    # width = int(16 * 8 / 64) * 4 = 8 channels in 4 groups of 2: Flax's feature_group_count layout.
    assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 2, 8)


@pytest.mark.slow  # 9-21 s: full-size models; CI runs it
def test_num_classes_and_float32_logits_under_bf16():
    model = tiny(dtype=jnp.bfloat16, num_classes=3)
    variables = init(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits = apply(model, variables, images())
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    _, updates = apply(model, variables, images(), train=True, mutable=["batch_stats"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))


@pytest.mark.slow  # 8-15 s of compiles; keeps the fast subset near 5 minutes; CI runs it
def test_zero_init_last_makes_blocks_identity_on_the_branch():
    variables = init(tiny(zero_init_last=True))
    params = variables["params"]
    assert not np.any(params["layer2_0"]["bn3"]["scale"])
    assert np.all(params["layer2_0"]["bn1"]["scale"] == 1)
    regnet = init(resnext_jax.create_model("regnet_x_400mf", zero_init_last=True), 64, 1)["params"]
    assert not np.any(regnet["block1_0"]["c_bn"]["scale"])


@pytest.mark.slow  # 9-21 s: full-size models; CI runs it
def test_group_norm_is_per_example():
    """Group norm (for tiny per-device batches) must not mix examples, unlike batch norm."""
    x = images(4)
    diffs = {}
    for norm in ("group", "batch"):
        model = tiny(norm=norm)
        variables = init(model)
        run = jax.jit(lambda batch: model.apply(variables, batch, train=True, mutable=["batch_stats"])[0])
        # Two images, not one: batch norm refuses one value per channel in training (the last map is 1x1 here).
        diffs[norm] = float(np.abs(run(x)[:2] - run(x[:2])).max())
    assert diffs["group"] < 1e-4 and diffs["batch"] > 1e-2, diffs
    grads = train_grads(tiny(norm="group"), init(tiny(norm="group")), x)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert "batch_stats" not in init(tiny(norm="group"))


@pytest.mark.slow  # 8-15 s of compiles; keeps the fast subset near 5 minutes; CI runs it
def test_squeeze_excitation_block():
    model = tiny(se_ratio=0.25)
    variables = init(model)
    se = variables["params"]["layer1_0"]["se"]
    # layer1 outputs 4 * 16 = 64 channels; squeeze to round(64 * 0.25) = 16.
    assert se["fc1"]["kernel"].shape == (1, 1, 64, 16) and se["fc2"]["kernel"].shape == (1, 1, 16, 64)
    grads = train_grads(model, variables, images())
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(grads["layer1_0"]["se"]["fc1"]["kernel"]).sum() > 0


def test_drop_path_rates_increase_linearly():
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_drop_path_statistics():
    x = jnp.ones((20000, 1, 1, 1))
    y = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y[:, 0, 0, 0] > 0)
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75)
    assert float(jnp.mean(y)) == pytest.approx(1.0, abs=0.02)
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x, deterministic=True), x)


@pytest.mark.slow  # 8-15 s of compiles; keeps the fast subset near 5 minutes; CI runs it
def test_drop_path_and_dropout_train_vs_eval():
    model = tiny(drop_path_rate=0.5, dropout_rate=0.5)
    variables = init(model)
    x = images()
    train = jax.jit(
        lambda seed: model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )[0]
    )
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(apply(model, variables, x), apply(model, variables, x))
    grads = train_grads(model, variables, x)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.slow  # 9-21 s: full-size models; CI runs it
def test_activations():
    variables = init(tiny(small_stem=True))
    outputs = {}
    for activation in ("relu", "silu", "gelu"):
        model = tiny(activation=activation, small_stem=True)
        outputs[activation] = np.asarray(jax.jit(model.apply)(variables, images()))
        grads = train_grads(model, variables, images())
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), activation
    assert not np.allclose(outputs["relu"], outputs["silu"])
    assert not np.allclose(outputs["silu"], outputs["gelu"])
    assert not np.allclose(outputs["relu"], outputs["gelu"])


def test_bad_activation_names_choices():
    with pytest.raises(ValueError, match="relu"):
        init(tiny(activation="swish"))


@pytest.mark.parametrize("hw", [(8, 8), (7, 10), (112, 112)], ids=["even", "odd", "stem"])
@pytest.mark.parametrize("channels", [16, 24, 5], ids=["c16", "c24", "c5-no-native"])
def test_stem_max_pool_gradient_matches_torch(hw, channels):
    """The training pool's input gradient (native on CPU where C is a multiple of 8, else flax's) against
    torch's MaxPool2d(3, 2, 1) backward, on ReLU-like inputs with exact ties (zeros and rounded values),
    where only the first maximum of each window may get the gradient."""
    import torch

    rng = np.random.default_rng(4)
    x = np.maximum(np.round(rng.standard_normal((2, *hw, channels)) * 2) / 2, 0).astype(np.float32)
    ho, wo = (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1
    dy = rng.standard_normal((2, ho, wo, channels)).astype(np.float32)
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    torch.nn.functional.max_pool2d(xt, 3, 2, 1).backward(torch.tensor(dy).permute(0, 3, 1, 2))
    grad = jax.jit(lambda x, g: jax.vjp(lambda x: max_pool_3x3s2(x, True, "cpu"), x)[1](g)[0])(x, dy)
    np.testing.assert_allclose(grad, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # 11 s; CI runs it
def test_conv_impls_agree_in_a_model():
    variables = init(tiny(conv_impl="xla"))
    np.testing.assert_allclose(
        apply(tiny(conv_impl="xla"), variables, images()),
        apply(tiny(conv_impl="split"), variables, images()),
        atol=1e-5,
    )


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("hw", [(8, 8), (7, 10)], ids=["even", "odd"])
def test_stem_max_pool_matches_torch_definition(train, hw):
    """3x3, stride 2, padding 1 with -inf (torch's MaxPool2d(3, 2, 1)), against a NumPy loop; negative inputs,
    so a zero padding would show."""
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, *hw, 5))) - 1.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1
    expected = np.stack(
        [
            np.stack([padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2)) for j in range(wo)], 1)
            for i in range(ho)
        ],
        1,
    )
    out = jax.jit(max_pool_3x3s2, static_argnums=(1, 2))(jnp.asarray(x), train, "cpu")
    np.testing.assert_array_equal(out, expected)
