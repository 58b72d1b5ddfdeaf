"""torchvision parity for every registered builder, plus the converter's strictness."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch_reference import randomized_torchvision, torch_logits, torchvision_skeleton

import resnext_jax
from resnext_jax.convert import ConversionError, from_torchvision, to_torchvision
from resnext_jax.summary import summarize

# The fast subset keeps the ResNet and ResNeXt builders here; RegNets (X and Y) are checked against torchvision
# in the fast subset by tests/test_scan.py (scanned regnet_x_400mf) and here in the slow list.
FAST = {"resnet18", "resnet50", "resnext50_32x4d"}
TORCHVISION = resnext_jax.list_models(source="torchvision")  # timm's names: tests/test_timm.py


def _marks(name: str):
    if name in FAST:
        return ()
    # regnet_y_128gf's parity holds 644 M parameters in torch float32 and float64 and in JAX: about 12 GB, alone.
    return (pytest.mark.slow, pytest.mark.alone) if name == "regnet_y_128gf" else pytest.mark.slow


ALL = [pytest.param(n, marks=_marks(n)) for n in TORCHVISION]
# How far bf16 may drift from float32 depends on the network (random deep nets amplify
# rounding: 1-9% relative L2 on logits here), so the yardstick is torch's own bf16 autocast
# on the same model and input. Ours measured within 1.15x of it; 1.5x plus 0.5% leaves room
# for summation-order luck while an overflow or a wrong cast gives O(100%).
BF16_VS_TORCH_AUTOCAST = 1.5
# Parity runs at 224 for one builder per family; the rest at a small odd size, where a wrong stride, padding or
# layout shows as surely and the large builders (regnet_y_128gf: 374 GFLOPs at 224) cost seconds, not minutes.
AT_224 = {"resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf"}


def _jit_apply(model):
    """The model's inference as one compiled program: a deep RegNet's eager apply compiles and dispatches each op
    (5 s for regnet_y_800mf at 65x79 in float32, 11 s in bfloat16; 0.9 s compiled)."""
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def _param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", TORCHVISION)
def test_param_count_equals_torchvision(name):
    model = resnext_jax.create_model(name)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    reference = torchvision_skeleton(name)
    assert _param_count(shapes["params"]) == sum(p.numel() for p in reference.parameters())
    assert _param_count(shapes["batch_stats"]) == sum(
        b.numel() for n, b in reference.named_buffers() if not n.endswith("num_batches_tracked")
    )


def _meta_at_224(name: str) -> dict:
    """torchvision's metadata of the first weights evaluated at 224 (SWAG-linear for regnet_y_128gf)."""
    weights = torchvision.models.get_model_weights(name)
    for tag in ("IMAGENET1K_V1", "IMAGENET1K_V2", "IMAGENET1K_SWAG_LINEAR_V1"):
        if hasattr(weights, tag) and getattr(weights, tag).transforms().crop_size == [224]:
            return getattr(weights, tag).meta
    raise AssertionError(f"no 224px weights for {name}")


@pytest.mark.parametrize("name", TORCHVISION)
def test_summary_matches_torchvision_meta(name):
    summary = summarize(name, 224)
    meta = _meta_at_224(name)
    assert summary["params"] == meta["num_params"]
    assert summary["gflops"] == pytest.approx(meta["_ops"], rel=0.01)
    reference = torchvision_skeleton(name)
    stages = (
        reference.trunk_output
        if hasattr(reference, "trunk_output")
        else [getattr(reference, f"layer{i}") for i in (1, 2, 3, 4)]
    )
    assert [row["params"] for row in summary["stages"]] == [sum(p.numel() for p in s.parameters()) for s in stages]
    assert summary["head_params"] == sum(p.numel() for p in reference.fc.parameters())


@pytest.mark.parametrize("name", ALL)
def test_torchvision_parity(name):
    """Logits close to torchvision's at an odd non-square size (and at 224x224 for one builder per family); exact
    round trip; bf16 close.

    The bound is 1e-4, or, where a random deep network amplifies float32 rounding past that (regnet_y_128gf at a
    small size), 4x torch's own float32 error against a float64 run of the same weights.
    """
    full_size = name in AT_224
    reference = randomized_torchvision(name, size=224 if full_size else 64)
    variables = from_torchvision(name, reference)
    model = resnext_jax.create_model(name)
    rng = np.random.default_rng(0)
    checked = []
    for shape in [(1, 224, 224, 3), (2, 97, 131, 3)] if full_size else [(2, 65, 79, 3)]:
        images = rng.standard_normal(shape, dtype=np.float32)
        expected = torch_logits(reference, images)
        logits = np.asarray(_jit_apply(model)(variables, jnp.asarray(images)))
        assert logits.dtype == np.float32
        checked.append((shape, images, expected, logits))

    state = to_torchvision(name, variables)
    original = reference.state_dict()
    assert state.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(state[key], value), key
    reference.load_state_dict(state, strict=True)

    half = resnext_jax.create_model(name, dtype=jnp.bfloat16)
    half_logits = np.asarray(_jit_apply(half)(variables, jnp.asarray(images)))
    assert half_logits.dtype == np.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_half = torch_logits(reference, images)
    ours = np.linalg.norm(half_logits - expected) / np.linalg.norm(expected)
    theirs = np.linalg.norm(torch_half - expected) / np.linalg.norm(expected)
    assert ours <= BF16_VS_TORCH_AUTOCAST * theirs + 5e-3, f"bf16 error {ours:.3g}, torch autocast {theirs:.3g}"

    for shape, images, expected, logits in checked:
        error = np.abs(logits - expected).max()
        if error > 1e-4:  # judge against float64 (the reference is no longer needed in float32)
            exact = torch_logits(reference.double(), images.astype(np.float64))
            torch_error = np.abs(expected - exact).max()
            assert np.abs(logits - exact).max() <= 4 * torch_error, (
                f"{name} at {shape}: error {error:.3g} against torch float32, torch's own float32 error "
                f"{torch_error:.3g}"
            )


@pytest.fixture(scope="module")
def resnet18_state():
    return {k: v.clone() for k, v in randomized_torchvision("resnet18").state_dict().items()}


def _expect_error(state, *fragments, **kwargs):
    with pytest.raises(ConversionError) as info:
        from_torchvision("resnet18", state, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_key_is_named(resnet18_state):
    state = dict(resnet18_state)
    del state["layer2.1.bn2.running_var"]
    _expect_error(state, "missing key: layer2.1.bn2.running_var")


def test_unexpected_key_is_named(resnet18_state):
    _expect_error({**resnet18_state, "layer2.1.extra.weight": torch.zeros(3)}, "unexpected key: layer2.1.extra.weight")
    _expect_error({**resnet18_state, "layer9.0.conv1.weight": torch.zeros(3)}, "unexpected key: layer9.0.conv1.weight")


def test_wrong_shape_is_named(resnet18_state):
    state = dict(resnet18_state)
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    _expect_error(state, "wrong shape: layer3.0.conv1.weight")


def test_all_problems_reported_at_once(resnet18_state):
    state = dict(resnet18_state)
    del state["bn1.weight"]
    state["fc.bias"] = torch.zeros(7)
    state["bogus"] = torch.zeros(1)
    _expect_error(state, "missing key: bn1.weight", "unexpected key: bogus", "wrong shape: fc.bias")


def test_new_head_only_when_asked(resnet18_state, caplog):
    _expect_error(resnet18_state, "reinit_head=True", num_classes=10)
    variables = from_torchvision("resnet18", resnet18_state, num_classes=10, reinit_head=True)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert "re-initialized" in caplog.text
    np.testing.assert_array_equal(
        variables["params"]["conv1"]["kernel"], resnet18_state["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )


def test_sources_module_state_dict_and_path_agree(resnet18_state, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    from_path = from_torchvision("resnet18", str(path))
    from_dict = from_torchvision("resnet18", resnet18_state)
    module = torchvision.models.resnet18()
    module.load_state_dict(resnet18_state)
    from_module = from_torchvision("resnet18", module)
    for a, b, c in zip(jax.tree.leaves(from_path), jax.tree.leaves(from_dict), jax.tree.leaves(from_module)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_unknown_weight_tag_lists_available():
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        from_torchvision("resnet18", "IMAGENET1K_V7")


def test_non_torchvision_option_cannot_export():
    model = resnext_jax.create_model("resnet18", se_ratio=0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ConversionError, match="se"):
        to_torchvision("resnet18", variables)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("resnext50_32x4d", {"stage_sizes": (1, 1), "num_filters": 16, "cardinality": 4}),
        ("regnet_x_400mf", {"depth": 4}),
    ],
    ids=["resnet", "regnet"],
)
def test_fresh_head_is_the_model_init_head(name, fields):
    """`reinit_head` initializes only the head (the backbone's ops are dropped): same values as `model.init`."""
    from resnext_jax.convert.core import fresh_head

    model = resnext_jax.create_model(name, num_classes=7, **fields)
    full = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(3))
    head = fresh_head(model, "fc", jax.random.key(3))
    assert set(head) == {("params", "fc", "kernel"), ("params", "fc", "bias")}
    for key, value in head.items():
        np.testing.assert_allclose(value, full["params"]["fc"][key[-1]], rtol=1e-6, atol=1e-9)
    assert float(np.std(head[("params", "fc", "kernel")])) > 0
