"""Model registry: torchvision's builder names and timm's model names -> Flax modules, plus each model's
preprocessing.

    model = create_model("resnext50_32x4d", num_classes=10, dtype=jnp.bfloat16)
    model = create_model("regnety_032")          # timm's name (resnext_jax.convert.from_timm loads its weights)
    list_models("regnety_*")                     # fnmatch patterns, as timm.list_models
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import numbers
import re
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from resnext_jax.errors import InputError
from resnext_jax.models.layers import ACTIVATIONS
from resnext_jax.models.norms import NORMS
from resnext_jax.models.pretrained import pretrained_config
from resnext_jax.models.regnet import ROUNDINGS, RegNet
from resnext_jax.models.resnet import STEM_TYPES, BasicBlock, Bottleneck, ResNet
from resnext_jax.models.timm_names import TIMM_REGNETS, TIMM_RESNETS, VARIANTS
from resnext_jax.models.timm_pretrained_cfgs import DEFAULT_TAGS
from resnext_jax.ops import CONV_IMPLS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model expects around it: the ImageNet eval preset of its default weights, and whose name it is.

    Attributes:
      name: the builder name.
      family: "resnet" or "regnet" (the module; with `sources` it selects the converter's name map).
      sources: the libraries whose weights of this name load exactly: ("torchvision",), ("timm",) or both
        (resnet50: one architecture, one entry). `resnext_jax.convert.from_timm` needs "timm" here.
      mean, std: per-channel normalization of [0, 1] RGB input.
      train_size: training crop.
      eval_size: evaluation center crop.
      resize_v1: shorter-side resize for IMAGENET1K_V1 weights (None if torchvision has none).
      resize_v2: shorter-side resize for IMAGENET1K_V2 weights (None if torchvision has none).
      interpolation: resize filter: "bilinear" (antialiased) for torchvision's presets, timm's default weights'
        filter ("bicubic" mostly) for a timm-only name.
      weights: torchvision weight tags that exist for this builder.
      crop_pct: for a timm-only name, its default weights' crop fraction: the eval resize is
        floor(eval_size / crop_pct) (`resnext_jax.models.pretrained` holds every timm tag's preset).
    """

    name: str
    family: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_size: int = 224
    eval_size: int = 224
    resize_v1: int | None = 256
    resize_v2: int | None = 232
    interpolation: str = "bilinear"
    weights: tuple[str, ...] = ("IMAGENET1K_V1", "IMAGENET1K_V2")
    sources: tuple[str, ...] = ("torchvision",)
    crop_pct: float | None = None


_RESNET = {"block_cls": Bottleneck}
_BUILDERS: dict[str, tuple[Callable[..., nn.Module], ModelInfo]] = {}


def _register(name: str, family: str, builder, **info):
    _BUILDERS[name] = (builder, ModelInfo(name=name, family=family, **info))


def _timm_preset(name: str) -> dict:
    """ModelInfo fields for a timm-only name: the eval preset of timm's default weights for it, no torchvision
    weights."""
    info = {"sources": ("timm",), "resize_v1": None, "resize_v2": None, "weights": ()}
    if name in DEFAULT_TAGS:
        cfg = pretrained_config(name)
        info.update(
            mean=cfg.mean, std=cfg.std, eval_size=cfg.input_size, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct
        )
    return info


_V1_ONLY = {"resize_v2": None, "weights": ("IMAGENET1K_V1",)}
_register("resnet18", "resnet", functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock), **_V1_ONLY)
_register("resnet34", "resnet", functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock), **_V1_ONLY)
_register("resnet50", "resnet", functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), **_RESNET))
_register("resnet101", "resnet", functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), **_RESNET))
_register("resnet152", "resnet", functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), **_RESNET))
_register(
    "resnext50_32x4d",
    "resnet",
    functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), cardinality=32, bottleneck_width=4, **_RESNET),
)
_register(
    "resnext101_32x8d",
    "resnet",
    functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), cardinality=32, bottleneck_width=8, **_RESNET),
)
_register(
    "resnext101_64x4d",
    "resnet",
    functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), cardinality=64, bottleneck_width=4, **_RESNET),
    resize_v1=None,
    weights=("IMAGENET1K_V1",),
)
_register(
    "wide_resnet50_2", "resnet", functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck_width=128, **_RESNET)
)
_register(
    "wide_resnet101_2", "resnet", functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), bottleneck_width=128, **_RESNET)
)

# (depth, w_0, w_a, w_m, group_width) from torchvision's builders.
_REGNET_X = {
    "400mf": (22, 24, 24.48, 2.54, 16),
    "800mf": (16, 56, 35.73, 2.28, 16),
    "1_6gf": (18, 80, 34.01, 2.25, 24),
    "3_2gf": (25, 88, 26.31, 2.25, 48),
    "8gf": (23, 80, 49.56, 2.88, 120),
    "16gf": (22, 216, 55.59, 2.1, 128),
    "32gf": (23, 320, 69.86, 2.0, 168),
}
_REGNET_Y = {
    "400mf": (16, 48, 27.89, 2.09, 8),
    "800mf": (14, 56, 38.84, 2.4, 16),
    "1_6gf": (27, 48, 20.71, 2.65, 24),
    "3_2gf": (21, 80, 42.63, 2.66, 24),
    "8gf": (17, 192, 76.82, 2.19, 56),
    "16gf": (18, 200, 106.23, 2.48, 112),
    "32gf": (20, 232, 115.89, 2.53, 232),
    "128gf": (27, 456, 160.83, 2.52, 264),
}
for _size, (_d, _w0, _wa, _wm, _gw) in _REGNET_X.items():
    _register(
        f"regnet_x_{_size}", "regnet", functools.partial(RegNet, depth=_d, w_0=_w0, w_a=_wa, w_m=_wm, group_width=_gw)
    )
for _size, (_d, _w0, _wa, _wm, _gw) in _REGNET_Y.items():
    _extra = {"resize_v1": None, "resize_v2": None, "weights": ()} if _size == "128gf" else {}
    _register(
        f"regnet_y_{_size}",
        "regnet",
        functools.partial(RegNet, depth=_d, w_0=_w0, w_a=_wa, w_m=_wm, group_width=_gw, se_ratio=0.25),
        **_extra,
    )


# timm's names for the same modules (resnext_jax.models.timm_names). A name timm shares with torchvision stays one
# entry, now loadable from both; a timm-only name takes the preset of timm's default weights for it. A variant's
# letters (resnet50d: "d") add their `VARIANTS` fields.
for _name, (_stages, _basic, _card, _width, _variants) in TIMM_RESNETS.items():
    if _name in _BUILDERS:
        _builder, _info = _BUILDERS[_name]
        _BUILDERS[_name] = (_builder, dataclasses.replace(_info, sources=("torchvision", "timm")))
    else:
        _fields = {k: v for variant in _variants for k, v in VARIANTS[variant].items()}
        _register(
            _name,
            "resnet",
            functools.partial(
                ResNet,
                stage_sizes=_stages,
                block_cls=BasicBlock if _basic else Bottleneck,
                cardinality=_card,
                bottleneck_width=_width,
                **_fields,
            ),
            **_timm_preset(_name),
        )
# Five timm RegNets round their widths the timm way (see timm_names).
for _name, (_d, _w0, _wa, _wm, _gw, _se, _timm_rounding) in TIMM_REGNETS.items():
    _fields = {"width_rounding": "timm"} if _timm_rounding else {}
    _register(
        _name,
        "regnet",
        functools.partial(RegNet, depth=_d, w_0=_w0, w_a=_wa, w_m=_wm, group_width=_gw, se_ratio=_se, **_fields),
        **_timm_preset(_name),
    )


def _timm_sort_key(name: str):
    """timm's natural order: digit runs compare as numbers (regnetx_002 < regnetx_016 < regnetx_120)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(pattern: str | None = None, *, source: str | None = None) -> list[str]:
    """Registered model names: torchvision's builders, then timm's names, in registration order.

    Args:
      pattern: an fnmatch pattern as in `timm.list_models` ("regnety_*", "*resnext*"); the matches come back in
        timm's natural order (numbers compare as numbers).
      source: "torchvision" or "timm": only names whose weights that library publishes under this name
        (`ModelInfo.sources`).
    """
    if source is not None and source not in ("torchvision", "timm"):
        raise InputError(f"source={source!r}; use 'torchvision', 'timm' or None (all)")
    names = [n for n, (_, info) in _BUILDERS.items() if source is None or source in info.sources]
    if pattern is None:
        return names
    if not isinstance(pattern, str):
        raise InputError(f"pattern must be an fnmatch string such as 'regnety_*', not {type(pattern).__name__}")
    return sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_timm_sort_key)


def _lookup(name: str):
    if not isinstance(name, str) or name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=5, cutoff=0.5) if isinstance(name, str) else []
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise InputError(f"unknown model {name!r}{hint}. resnext_jax.list_models() lists all {len(_BUILDERS)}.")
    return _BUILDERS[name]


def model_fields(name: str) -> set[str]:
    """The module fields `create_model(name, **overrides)` accepts as overrides; an unknown name is an InputError."""
    builder = _lookup(name)[0]
    module = getattr(builder, "func", builder)
    return {f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


def create_model(name: str, **overrides) -> nn.Module:
    """Builds the Flax module for `name` (a torchvision builder or a timm name), with any module field overridden.

    Example: `create_model("resnext50_32x4d", num_classes=10, dtype=jnp.bfloat16, drop_path_rate=0.1)`.
    Raises `InputError` (a ValueError) for an unknown name (listing the closest matches), an unknown field, or a
    field value no model can be built with (`cardinality=0`, `dropout_rate=1.0`, `norm="layer"`...), naming the
    field, the value and the allowed range: such values otherwise fail deep inside a JAX trace, or not at all.
    """
    builder, _ = _lookup(name)
    module_cls = builder.func
    fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hints = {k: difflib.get_close_matches(k, fields, n=3) for k in unknown}
        raise InputError(f"{name} has no field(s) {unknown}; closest: {hints}. Fields: {sorted(fields)}")
    model = builder(**overrides)
    problems = _field_problems(model)
    if problems:
        raise InputError(f"cannot build {name}: " + "; ".join(problems))
    return model


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_at_least(low: int):
    return lambda value: _is_int(value) and value >= low


def _real_in(low: float, high: float):
    # `low <= value < high` is False for NaN, so NaN is refused too.
    return lambda value: _is_real(value) and low <= value < high


def _float_dtype(value) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        return False


def _positive_ints(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 1 for v in value)


# field -> (accepts the value?, what is allowed). Checked for every model that has the field.
_FIELD_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "num_classes": (_int_at_least(0), "an integer >= 0 (0: no head, the logits are the pooled features)"),
    "cardinality": (_int_at_least(1), "an integer >= 1 (groups of each 3x3 conv)"),
    "bottleneck_width": (_int_at_least(1), "an integer >= 1 (channels per group in the first stage)"),
    "num_filters": (_int_at_least(1), "an integer >= 1 (width of the first stage)"),
    "stage_sizes": (_positive_ints, "a non-empty list of integers >= 1 (blocks per stage), e.g. (3, 4, 6, 3)"),
    "stem_width": (_int_at_least(1), "an integer >= 1"),
    "stem_type": (lambda v: v in STEM_TYPES, f"one of {list(STEM_TYPES)} ('': one 7x7 conv; timm's deep 3x3 stems)"),
    "avg_down": (lambda v: isinstance(v, bool) or v in (0, 1), "True or False (average-pool shortcuts)"),
    "se_divisor": (_int_at_least(1), "an integer >= 1 (SE widths round to multiples of it; 8 in timm's SE-ResNets)"),
    "width_rounding": (lambda v: v in ROUNDINGS, "'torchvision' or 'timm' (whose RegNet width rules)"),
    "depth": (_int_at_least(1), "an integer >= 1 (blocks in all)"),
    "group_width": (_int_at_least(1), "an integer >= 1 (channels per group)"),
    "w_0": (lambda v: _is_real(v) and v > 0, "a number > 0 (the first block's width)"),
    "w_a": (_real_in(0, float("inf")), "a number >= 0 (width slope)"),
    "w_m": (lambda v: _is_real(v) and v > 1, "a number > 1 (width multiplier between stages)"),
    "bottleneck_multiplier": (lambda v: _is_real(v) and v > 0, "a number > 0"),
    "norm": (
        lambda v: v in NORMS if isinstance(v, str) else callable(v),
        f"one of {list(NORMS)} or a norm definition (a Flax module class or a functools.partial of one)",
    ),
    "norm_groups": (_int_at_least(1), "an integer >= 1 (groups of the group norm)"),
    "activation": (lambda v: isinstance(v, str) and v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}"),
    "drop_path_rate": (_real_in(0, 1), "a number in [0, 1) (1 would drop every residual branch)"),
    "dropout_rate": (_real_in(0, 1), "a number in [0, 1) (1 would drop every feature)"),
    "se_ratio": (_real_in(0, float("inf")), "a number >= 0 (0: no squeeze-excitation; RegNetY has 0.25)"),
    "conv_impl": (lambda v: v in CONV_IMPLS, f"one of {list(CONV_IMPLS)}"),
    "dtype": (_float_dtype, "a floating dtype such as jnp.float32, jnp.bfloat16 or jnp.float16"),
    "bn_axis_name": (lambda v: v is None or isinstance(v, (str, tuple)), "None or a mesh axis name"),
    "zero_init_last": (lambda v: isinstance(v, bool) or v in (0, 1), "True or False"),
    "small_stem": (lambda v: isinstance(v, bool) or v in (0, 1), "True or False"),
    "scan_blocks": (lambda v: isinstance(v, bool) or v in (0, 1), "True or False"),
}


def _field_problems(model: nn.Module) -> list[str]:
    """Every field value of `model` that no network can be built with, as "field=value ...; use ..." lines.

    Cheap checks only (no tracing): each field's range, then the few that depend on two fields.
    """
    problems = []
    for field, (accepts, allowed) in _FIELD_RULES.items():
        if hasattr(model, field):
            value = getattr(model, field)
            try:
                ok = bool(accepts(value))
            except TypeError:  # e.g. an unhashable value tested for membership
                ok = False
            if not ok:
                problems.append(f"{field}={value!r} is not allowed; use {allowed}")
    if problems:
        return problems  # the combined checks below assume each field is valid on its own
    if isinstance(model, ResNet) and model.block_cls is BasicBlock:
        for field, default in (("cardinality", 1), ("bottleneck_width", 64)):
            if getattr(model, field) != default:
                problems.append(
                    f"{field}={getattr(model, field)!r} is not allowed with basic blocks "
                    f"(resnet18/34); use {default}, or a bottleneck model such as resnext50_32x4d"
                )
    elif isinstance(model, ResNet) and model.num_filters * model.bottleneck_width < 64:
        problems.append(
            f"bottleneck_width={model.bottleneck_width} with num_filters={model.num_filters} gives "
            f"0 channels per group in layer1 (int(num_filters * bottleneck_width / 64)); "
            f"use num_filters * bottleneck_width >= 64"
        )
    if isinstance(model, ResNet) and model.stem_type == "deep_tiered" and model.stem_width < 4:
        problems.append(
            f"stem_width={model.stem_width} gives the tiered stem's first conv 3 * (stem_width // 4) = 0 "
            f"channels; use stem_width >= 4 (timm's is 32)"
        )
    return problems


def model_info(name: str) -> ModelInfo:
    """Preprocessing metadata for `name` (mean, std, train/eval size, V1/V2 resize sizes, crop_pct) and whose
    name it is (`sources`). Per timm weight tag: `resnext_jax.models.pretrained.pretrained_config`."""
    return _lookup(name)[1]
