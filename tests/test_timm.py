"""timm's weights: parity with timm, every registered timm name's variable tree against timm's state_dict, and the
converter's strictness. Random-init timm models only: nothing is downloaded. (Names: tests/test_timm_names.py.)"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util
from torch_reference import torch_logits

import resnext_jax
from resnext_jax.convert import (
    ConversionError,
    WeightsDownloadError,
    from_timm,
    from_torchvision,
    to_timm,
)
from resnext_jax.convert import timm as timm_convert
from resnext_jax.convert.core import flax_shape
from resnext_jax.errors import InputError
from resnext_jax.models.init import variable_shapes

TIMM_NAMES = resnext_jax.list_models(source="timm")
# Small names that between them take every rule of the name map (7x7, deep and tiered stems, both shortcuts, SE on
# both blocks, group norm, RegNetX/Y, timm's width rounding); the other trees are slow-marked (eval_shape of the
# large ones takes seconds each).
FAST_TREES = {
    "resnet10t",
    "resnet14t",
    "resnet18",
    "resnet18d",
    "resnet50s",
    "resnet50_gn",
    "seresnet18",
    "seresnext26t_32x4d",
    "regnetx_002",
    "regnetx_004",
    "regnety_002",
}
# Parity (forward passes: 10-60 s a name on two cores) for one name per way the modules and the converter build a
# network: each stem, shortcut, block, SE placement and norm, and both RegNet width roundings. The other names
# repeat these layers at other widths and depths (their trees are checked key by key above); the huge ones
# (resnext101_32x32d, regnety_1280...) would need minutes and gigabytes each.
PARITY_FAST = ["resnet18", "resnet18d", "regnetx_002", "regnety_002"]
# 224x224 for one ResNet and one RegNet (with timm's own stem and rounding); the rest at a small odd size, where a
# wrong stride, padding or layout shows as surely.
AT_224 = {"resnet18d", "regnety_002"}
PARITY_SLOW = [
    "resnet10t",
    "seresnet18",
    "resnet26t",
    "seresnext26d_32x4d",
    "resnet50s",
    "resnet50_gn",
    "seresnext50_32x4d",
    "resnext50d_32x4d",
    "regnetx_004",
    "regnety_008",
]


def _randomized_timm(name: str, seed: int = 0, size: int = 224) -> torch.nn.Module:
    """timm's `name` in eval mode with random weights, and every norm's affine parameters and running statistics
    random too (identity values would hide a swapped per-channel vector); the head is scaled to logits of std 2,
    like tests/torch_reference.py's torchvision models."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in batch_norms:  # calibrate on a random batch (cumulative average): deep random nets keep O(1) values
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(max(4, 4 * 224**2 // size**2), 3, size, size))  # as many pixels as 4 at 224
        for norm in (m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))):
            norm.weight.uniform_(0.8, 1.2)
            norm.bias.normal_(0.0, 0.2)
        for norm in batch_norms:
            spread = torch.empty_like(norm.running_var).uniform_(0.8, 1.25)
            norm.running_mean.add_(torch.randn_like(norm.running_mean) * 0.1 * norm.running_var.sqrt())
            norm.running_var.mul_(spread).clamp_(min=0.01)  # dead channels would divide by sqrt(eps)
            norm.num_batches_tracked.zero_()
            norm.momentum = 0.1
        model.eval()
        scale = 2.0 / model(torch.randn(1, 3, size, size)).std()
        model.get_classifier().weight.mul_(scale)
        model.get_classifier().bias.mul_(scale)
    return model


def _meta_timm(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def _enough_memory(name: str) -> bool:
    """Parity holds three copies of the weights (torch float64 and float32, ours): 16 bytes a parameter."""
    params = sum(p.numel() for p in _meta_timm(name).parameters())
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 16 * params + (2 << 30) < available


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST_TREES else pytest.mark.slow) for n in TIMM_NAMES]
)
def test_variable_tree_equals_timm(name):
    """Every timm parameter and buffer maps to one of our variables with the same shape, and nothing is left over:
    a key-by-key check of the architecture (counts alone could hide two swapped widths). Shapes only: timm's
    model on the meta device, ours traced."""
    reference = _meta_timm(name)
    ours = resnext_jax.create_model(name)
    names = timm_convert.key_map(resnext_jax.model_info(name).family, ours)
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(variable_shapes(ours, 64)).items()}
    mapped = {}
    for key, tensor in reference.state_dict().items():
        target = names.flax_key(key)
        assert target is not None, f"{name}: timm key {key} has no Flax counterpart"
        if target[0] is not None:
            mapped[target[0]] = flax_shape(target[1], target[2], tuple(tensor.shape))
    assert mapped == expected
    params = sum(math.prod(s) for k, s in expected.items() if k[0] == "params")
    assert params == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", PARITY_FAST + [pytest.param(n, marks=pytest.mark.slow) for n in PARITY_SLOW])
def test_timm_parity(name):
    """Our logits are about as close to timm's float64 logits as timm's own float32 ones (224x224 and 97x131 for
    the names in AT_224, 65x79 for the others)."""
    if not _enough_memory(name):
        pytest.skip(f"{name}: parity needs 16 bytes per parameter of free memory")
    size = 224 if name in AT_224 else 64
    reference = _randomized_timm(name, size=size)
    variables = from_timm(name, reference)
    model = resnext_jax.create_model(name)
    rng = np.random.default_rng(0)
    reference64 = _randomized_timm(name, size=size).double()
    errors, noise = {}, 0.0
    for shape in [(1, 224, 224, 3), (2, 97, 131, 3)] if size == 224 else [(2, 65, 79, 3)]:
        images = rng.standard_normal(shape, dtype=np.float32)
        with torch.no_grad():
            torch64 = reference64(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
        ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images)))
        errors[shape] = np.abs(ours - torch64).max(), torch64.std()
        # timm's own float32 error, on the images and on two copies moved by 1e-7 (relative: float32 rounding):
        # random SE networks (gates on random statistics) amplify rounding differently for every input, e.g. a
        # random seresnext50_32x4d's float32 logits err by 0.001 to 0.019 over such copies, and ours by 0.037.
        for copy in range(3):
            moved = images * (1 + 1e-7 * rng.standard_normal(shape, dtype=np.float32)) if copy else images
            noise = max(noise, np.abs(torch_logits(reference, moved) - torch64).max())
    # A wrong layer moves the logits O(1) (their std is about 2); float32 order alone, up to a few times timm's.
    for shape, (error, std) in errors.items():
        bound = 8 * noise + 1e-3 * std
        assert error <= bound, f"{name} at {shape}: |ours - float64| {error:.3g} > {bound:.3g} (logit std 2)"


def _random_state(name: str) -> dict[str, torch.Tensor]:
    """timm's state_dict keys of `name`, every float tensor random, `num_batches_tracked` 0 (no model is built)."""
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else torch.zeros((), dtype=v.dtype)
        for k, v in _meta_timm(name).state_dict().items()
    }


# A deep stem, average-pool shortcuts and SE (where downsample.1 is a conv), group norm (no running statistics),
# and a RegNet (blocks counted from 1 in timm).
@pytest.mark.parametrize("name", ["seresnext26d_32x4d", "resnet50_gn", "regnety_002"])
def test_round_trip_is_exact_and_timm_loads_it(name):
    original = _random_state(name)
    state = to_timm(name, from_timm(name, original))
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
    timm.create_model(name).load_state_dict(state, strict=True)


def test_scanned_layout_converts_both_ways():
    original = _random_state("regnety_002")
    scanned = from_timm("regnety_002", original, scan_blocks=True)
    assert "block3_rest" in scanned["params"]
    state = to_timm("regnety_002", scanned)
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_safetensors_and_pth_files(tmp_path):
    from safetensors.torch import save_file

    state = _randomized_timm("regnetx_002").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "model.pth")
    direct = from_timm("regnetx_002", state)
    for path in (tmp_path / "model.safetensors", str(tmp_path / "model.pth")):
        loaded = from_timm("regnetx_002", path)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, direct))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot read .* as a safetensors file"):
        from_timm("regnetx_002", tmp_path / "broken.safetensors")


def test_every_wrong_key_is_named_in_one_error():
    state = dict(timm.create_model("regnetx_002").state_dict())
    del state["s2.b1.conv2.conv.weight"]
    state["s1.b1.extra.weight"] = torch.zeros(3)
    state["s1.b0.conv1.conv.weight"] = torch.zeros(3)  # timm counts blocks from 1
    state["s3.b2.conv1.bn.weight"] = torch.zeros(7)
    with pytest.raises(ConversionError) as error:
        from_timm("regnetx_002", state)
    message = str(error.value)
    assert message.splitlines()[0].startswith(
        "cannot load this checkpoint into regnetx_002: 1 missing, 2 unexpected, 1 wrong shape"
    )
    for key in (
        "missing key: s2.b1.conv2.conv.weight (56, 8, 3, 3)",
        "unexpected key: s1.b1.extra.weight",
        "unexpected key: s1.b0.conv1.conv.weight",
        "wrong shape: s3.b2.conv1.bn.weight: checkpoint (7,)",
    ):
        assert key in message


def test_weights_of_another_name_are_named():
    with pytest.raises(ConversionError, match=r"they look like regnety_002's: from_timm\('regnety_002'"):
        from_timm("regnety_004", timm.create_model("regnety_002").state_dict())


def test_weights_of_another_variant_are_named():
    """resnet26d's weights given as resnet26 (the stages match three names): its deep stem and average-pool
    shortcut keys are named, and so is resnet26d."""
    with pytest.raises(ConversionError) as error:
        from_timm("resnet26", _random_state("resnet26d"))
    message = str(error.value)
    assert "they look like resnet26d's: from_timm('resnet26d', ...)" in message.splitlines()[0]
    for line in (
        "missing key: conv1.weight (64, 3, 7, 7)",
        "unexpected key: conv1.0.weight",
        "unexpected key: layer1.0.downsample.2.running_var",
        "wrong shape: layer1.0.downsample.1.weight: checkpoint (256, 64, 1, 1), resnet26 wants (256,)",
    ):
        assert line in message


def test_regnet_sent_to_the_wrong_converter_names_the_right_one():
    import torchvision

    with pytest.raises(ConversionError, match=r"timm RegNet weights .*from_timm\('regnetx_032'"):
        from_torchvision("regnet_x_3_2gf", _random_state("regnetx_032"))
    tv_state = {k: torch.zeros(v.shape) for k, v in torchvision.models.regnet_y_400mf().state_dict().items()}
    with pytest.raises(ConversionError, match=r"torchvision RegNet weights .*from_torchvision\('regnet_y_400mf'"):
        from_timm("regnety_004", tv_state)


def test_torchvision_name_points_to_timms():
    with pytest.raises(InputError, match=r"regnet_x_3_2gf is torchvision's name.*from_timm\('regnetx_032'"):
        from_timm("regnet_x_3_2gf", {})


def test_weight_tags_fail_in_one_line_offline(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsDownloadError) as error:
        from_timm("resnext50_32x4d", "resnext50_32x4d.a1h_in1k")
    assert "\n" not in str(error.value)
    assert "huggingface.co/timm/resnext50_32x4d.a1h_in1k/resolve/main/model.safetensors" in str(error.value)
    with pytest.raises(InputError, match=r"regnetx_032's weights, not regnety_032's"):
        from_timm("regnety_032", "regnetx_032.tv2_in1k")
    with pytest.raises(InputError, match="unknown timm weight tag 'regnety_032.nope'.*regnety_032.ra_in1k"):
        from_timm("regnety_032", "regnety_032.nope")
    with pytest.raises(InputError, match="does not exist, and it is not a timm weight tag"):
        from_timm("regnety_032", str(tmp_path / "missing.safetensors"))
