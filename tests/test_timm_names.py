"""timm's names in our registry: which ones we register, why the others wait, the patterns `list_models` takes
and the arithmetic of timm's RegNet widths. Nothing here runs a network."""

from __future__ import annotations

import fnmatch

import pytest
import timm

import resnext_jax
from resnext_jax.errors import InputError
from resnext_jax.models import timm_names
from resnext_jax.models.regnet import regnet_widths


def test_list_models_patterns_follow_timm():
    for pattern in ("regnety_*", "regnetx_0?2", "resnext101*", "wide_*", "seresnext*", "resnet*d"):
        ours = resnext_jax.list_models(pattern)
        assert ours and ours == [n for n in timm.list_models(pattern) if n in ours], pattern
    everything = resnext_jax.list_models()
    assert {"resnet50", "regnet_y_400mf", "regnety_032", "resnext101_32x16d", "resnet50d"} <= set(everything)
    assert everything.index("regnet_y_128gf") < everything.index("resnet26")  # torchvision's first
    assert "regnetx_032" not in resnext_jax.list_models(source="torchvision")
    assert "regnet_x_3_2gf" not in resnext_jax.list_models(source="timm")
    assert resnext_jax.model_info("resnet50").sources == ("torchvision", "timm")
    assert resnext_jax.model_info("regnety_032").sources == ("timm",)
    with pytest.raises(InputError, match="source='bogus'"):
        resnext_jax.list_models(source="bogus")


def test_every_regnet_is_registered_or_explained():
    from timm.models.regnet import model_cfgs

    registered = set(resnext_jax.list_models(source="timm"))
    for name in model_cfgs:
        assert (name in registered) != (name in timm_names.SKIPPED_REGNETS), name
    rounding = [n for n, cfg in timm_names.TIMM_REGNETS.items() if cfg[-1]]
    assert all(resnext_jax.create_model(n).width_rounding == "timm" for n in rounding)


def test_every_resnet_is_registered_or_explained_once():
    """Each of timm's ResNet-module names is registered, or matches exactly one skip pattern (and is not both)."""
    registered = set(resnext_jax.list_models(source="timm"))
    assert set(timm_names.TIMM_RESNETS) <= registered
    for name in timm.list_models(module="resnet"):
        reasons = [p for p in timm_names.SKIPPED_RESNETS if fnmatch.fnmatchcase(name, p)]
        assert len(reasons) == (0 if name in registered else 1), (name, reasons)
    assert all(fnmatch.filter(timm.list_models(module="resnet"), p) for p in timm_names.SKIPPED_RESNETS)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("resnet50d", {"stem_type": "deep", "stem_width": 32, "avg_down": True, "se_ratio": 0.0}),
        ("resnet50s", {"stem_type": "deep", "stem_width": 64, "avg_down": False}),
        ("resnet26t", {"stem_type": "deep_tiered", "avg_down": True}),
        (
            "seresnext26d_32x4d",
            {
                "stem_type": "deep",
                "avg_down": True,
                "se_ratio": 1 / 16,
                "se_divisor": 8,
                "cardinality": 32,
                "bottleneck_width": 4,
                "stage_sizes": (2, 2, 2, 2),
            },
        ),
        ("seresnet18", {"stem_type": "", "se_ratio": 1 / 16, "se_divisor": 8}),
        ("resnet50_gn", {"norm": "group", "norm_groups": 32, "stem_type": ""}),
    ],
)
def test_variants_are_timms_model_args(name, fields):
    """The variant letters give the fields timm's `_create_resnet` model_args name (the per-name tree and
    parity tests in test_timm.py check what they build)."""
    model = resnext_jax.create_model(name)
    assert {k: getattr(model, k) for k in fields} == fields
    assert resnext_jax.model_info(name).sources == ("timm",)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"stem_type": "deeper"}, r"stem_type='deeper' is not allowed; use one of \['', 'deep', 'deep_tiered'\]"),
        ({"stem_type": "deep_tiered", "stem_width": 3}, r"stem_width=3 gives the tiered stem's first conv .* >= 4"),
        ({"stem_width": 0}, "stem_width=0 is not allowed; use an integer >= 1"),
        ({"avg_down": "yes"}, "avg_down='yes' is not allowed; use True or False"),
        ({"se_divisor": 0}, "se_divisor=0 is not allowed; use an integer >= 1"),
    ],
)
def test_variant_fields_are_checked(fields, message):
    with pytest.raises(InputError, match=message):
        resnext_jax.create_model("resnet50d", **fields)


def test_width_rounding_is_checked():
    with pytest.raises(InputError, match="width_rounding='tf' is not allowed; use 'torchvision' or 'timm'"):
        resnext_jax.create_model("regnetx_004", width_rounding="tf")


@pytest.mark.parametrize("name", list(timm_names.TIMM_REGNETS))
def test_widths_follow_timm(name):
    """`regnet_widths(..., rounding="timm")` is timm's arithmetic for every config; torchvision's rounding (the
    default) agrees except for the five names marked for timm rounding."""
    from timm.models.regnet import RegNet, model_cfgs

    cfg = model_cfgs[name]
    stages, _ = RegNet._get_stage_args(RegNet.__new__(RegNet), cfg)
    expected = ([s["out_chs"] for s in stages], [s["depth"] for s in stages], [s["group_size"] for s in stages])
    design = (cfg.depth, cfg.w0, cfg.wa, cfg.wm, cfg.group_size)
    timm_rounding = timm_names.TIMM_REGNETS[name][-1]
    if cfg.group_min_ratio:  # the *_tv names use torchvision's rounding
        assert regnet_widths(*design) == expected
    else:
        assert regnet_widths(*design, rounding="timm") == expected
        assert (regnet_widths(*design) != expected) == timm_rounding
