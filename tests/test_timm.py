"""timm's names and weights: parity with timm for every registered timm name, the converter's strictness, and
the registry's names and patterns. Random-init timm models only: nothing is downloaded."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
from resnext_jax.errors import InputError
from resnext_jax.models import timm_names
from resnext_jax.models.regnet import regnet_widths

timm = pytest.importorskip("timm")

TIMM_NAMES = resnext_jax.list_models(source="timm")
FAST = {"regnetx_002", "regnety_002", "resnet18"}
ALL = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in TIMM_NAMES]


def _randomized_timm(name: str, seed: int = 0) -> torch.nn.Module:
    """timm's `name` with random weights and random BN statistics and affine parameters (eval mode); the head is
    scaled to logits of std 2, like tests/torch_reference.py's torchvision models."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # calibrate on a random batch so deep random networks keep O(1) activations
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 224, 224))
        for norm in norms:
            norm.weight.uniform_(0.8, 1.2)
            norm.bias.normal_(0.0, 0.2)
            norm.running_mean.add_(torch.randn_like(norm.running_mean) * 0.1 * norm.running_var.sqrt())
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.8, 1.25)).clamp_(min=0.01)
            norm.num_batches_tracked.zero_()
            norm.momentum = 0.1
        model.eval()
        head = model.get_classifier()
        scale = 2.0 / model(torch.randn(1, 3, 224, 224)).std()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return model


def _meta_timm(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def _enough_memory(name: str) -> bool:
    """Parity holds three copies of the weights (torch float64 and float32, ours): 16 bytes a parameter."""
    params = sum(p.numel() for p in _meta_timm(name).parameters())
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 16 * params + (2 << 30) < available


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_variable_tree_equals_timm(name):
    """Every timm parameter and buffer maps to one of our variables with the same shape, and nothing is left over:
    a key-by-key check of the architecture (counts alone could hide two swapped widths)."""
    model = _meta_timm(name)
    family = resnext_jax.model_info(name).family
    ours = resnext_jax.create_model(name)
    shapes = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    mapped = {}
    for key, tensor in model.state_dict().items():
        target = timm_convert.flax_key(family, key)
        assert target is not None, f"{name}: timm key {key} has no Flax counterpart"
        if target[0] is not None:
            mapped[target[0]] = timm_convert._tv._flax_shape(target[1], target[2], tuple(tensor.shape))
    assert mapped == expected
    params = sum(math.prod(s) for k, s in expected.items() if k[0] == "params")
    assert params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_timm_parity(name):
    """Our logits are about as close to timm's float64 logits as timm's own float32 ones (224x224 and 97x131)."""
    if not _enough_memory(name):
        pytest.skip(f"{name}: parity needs 16 bytes per parameter of free memory")
    reference = _randomized_timm(name)
    variables = from_timm(name, reference)
    model = resnext_jax.create_model(name)
    rng = np.random.default_rng(0)
    reference64 = _randomized_timm(name).double()
    for shape in [(1, 224, 224, 3), (2, 97, 131, 3)]:
        images = rng.standard_normal(shape, dtype=np.float32)
        torch32 = torch_logits(reference, images)
        with torch.no_grad():
            torch64 = reference64(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()
        ours = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
        # float32 summation order alone moves logits by about torch32's own error, which random RegNetYs (SE gates
        # on random statistics) amplify to 1e-3 at times (measured up to 4.3x torch32's); a wrong layer moves
        # them O(1) (the logits' std is about 2).
        bound = 8 * np.abs(torch32 - torch64).max() + 1e-3 * torch64.std()
        error = np.abs(ours - torch64).max()
        assert error <= bound, f"{name} at {shape}: |ours - float64| {error:.3g} > {bound:.3g} (logit std 2)"


def test_round_trip_is_exact_and_timm_loads_it():
    reference = _randomized_timm("regnety_002")
    original = reference.state_dict()
    variables = from_timm("regnety_002", reference)
    state = to_timm("regnety_002", variables)
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor) or key.endswith("num_batches_tracked"), key
    timm.create_model("regnety_002").load_state_dict(state, strict=True)
    # The scanned layout converts both ways too.
    scanned = from_timm("regnety_002", reference, scan_blocks=True)
    assert "block3_rest" in scanned["params"]
    again = to_timm("regnety_002", scanned)
    assert all(torch.equal(again[k], state[k]) for k in state)


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
    assert message.splitlines()[0].startswith("cannot load this checkpoint into regnetx_002: 1 missing, 2 unexpected, "
                                              "1 wrong shape")
    for key in ("missing key: s2.b1.conv2.conv.weight (56, 8, 3, 3)", "unexpected key: s1.b1.extra.weight",
                "unexpected key: s1.b0.conv1.conv.weight", "wrong shape: s3.b2.conv1.bn.weight: checkpoint (7,)"):
        assert key in message


def test_weights_of_another_name_are_named():
    with pytest.raises(ConversionError, match=r"they look like regnety_002's: from_timm\('regnety_002'"):
        from_timm("regnety_004", timm.create_model("regnety_002").state_dict())


def test_regnet_sent_to_the_wrong_converter_names_the_right_one():
    import torchvision

    with pytest.raises(ConversionError, match=r"timm RegNet weights .*from_timm\('regnetx_032'"):
        from_torchvision("regnet_x_3_2gf", _meta_state("regnetx_032"))
    tv_state = {k: torch.zeros(v.shape) for k, v in torchvision.models.regnet_y_400mf().state_dict().items()}
    with pytest.raises(ConversionError, match=r"torchvision RegNet weights .*from_torchvision\('regnet_y_400mf'"):
        from_timm("regnety_004", tv_state)


def _meta_state(name):
    return {k: torch.zeros(v.shape) for k, v in _meta_timm(name).state_dict().items()}


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


def test_list_models_patterns_follow_timm():
    for pattern in ("regnety_*", "regnetx_0?2", "resnext101*", "wide_*"):
        ours = resnext_jax.list_models(pattern)
        assert ours and ours == [n for n in timm.list_models(pattern) if n in ours], pattern
    everything = resnext_jax.list_models()
    assert {"resnet50", "regnet_y_400mf", "regnety_032", "resnext101_32x16d"} <= set(everything)
    assert everything.index("regnet_y_128gf") < everything.index("resnet26")  # torchvision's first
    assert "regnetx_032" not in resnext_jax.list_models(source="torchvision")
    assert "regnet_x_3_2gf" not in resnext_jax.list_models(source="timm")
    assert resnext_jax.model_info("resnet50").sources == ("torchvision", "timm")
    assert resnext_jax.model_info("regnety_032").sources == ("timm",)
    with pytest.raises(InputError, match="source='bogus'"):
        resnext_jax.list_models(source="bogus")


def test_every_plain_timm_name_is_registered_and_the_rest_are_explained():
    from timm.models.regnet import model_cfgs

    registered = set(resnext_jax.list_models(source="timm"))
    for name in model_cfgs:
        assert (name in registered) != (name in timm_names.SKIPPED_REGNETS), name
    rounding = [n for n, cfg in timm_names.TIMM_REGNETS.items() if cfg[-1]]
    assert all(resnext_jax.create_model(n).width_rounding == "timm" for n in rounding)
    plain = set(timm_names.TIMM_RESNETS)
    assert plain <= registered


@pytest.mark.parametrize("name", list(timm_names.TIMM_REGNETS))
def test_widths_follow_timm(name):
    """`timm_regnet_widths` is timm's arithmetic for every config; torchvision's (`regnet_widths`, what `RegNet`
    computes) agrees except for the five names marked for timm rounding."""
    from timm.models.regnet import RegNet, model_cfgs

    cfg = model_cfgs[name]
    stages, _ = RegNet._get_stage_args(RegNet.__new__(RegNet), cfg)
    expected = ([s["out_chs"] for s in stages], [s["depth"] for s in stages], [s["group_size"] for s in stages])
    design = (cfg.depth, cfg.w0, cfg.wa, cfg.wm, cfg.group_size)
    timm_rounding = timm_names.TIMM_REGNETS[name][-1]
    if cfg.group_min_ratio:  # the *_tv names use torchvision's rounding
        assert regnet_widths(*design) == expected
    else:
        assert timm_names.timm_regnet_widths(*design) == expected
        assert (regnet_widths(*design) != expected) == timm_rounding
