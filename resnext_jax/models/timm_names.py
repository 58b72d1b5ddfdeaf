"""timm's model names that our modules express exactly, from timm's own design parameters (timm 1.0.31).

timm's RegNets are built by `timm/models/regnet.py` from `model_cfgs`; the X and Y ones with a plain conv1x1
shortcut, no pre-activation and no linear output are our `RegNet` with other key names. Two rounding rules
exist: torchvision's (`_make_divisible`, round half up and never more than 10% down), which timm uses only for its
`*_tv` names (`group_min_ratio=0.9`), and timm's own `quantize_float` (Python's round, half to even). They give
different widths for five names (regnetx_004, regnetx_040, regnety_008, regnety_040, regnety_080: a stage width
whose bottleneck is an odd multiple of half the group width); `regnet_widths(..., rounding="timm")` is timm's
rule, which those five build with (`RegNet(width_rounding="timm")`).

timm's plain ResNets (7x7 stem, conv1x1 shortcut, no attention or anti-aliasing) have torchvision's keys and
arithmetic; where timm and torchvision share a name it is one registry entry. Its variants (deep stems,
average-pool shortcuts, SE, GroupNorm: the letters of `VARIANTS`) are fields of the same `ResNet`.
"""

from __future__ import annotations

# name -> (depth, w_0, w_a, w_m, group_width, se_ratio, timm_rounding): timm's model_cfgs for the RegNets our
# module expresses. timm_rounding marks the five names where timm's rounding differs from torchvision's.
TIMM_REGNETS = {
    "regnetx_002": (13, 24, 36.44, 2.49, 8, 0.0, False),
    "regnetx_004": (22, 24, 24.48, 2.54, 16, 0.0, True),
    "regnetx_004_tv": (22, 24, 24.48, 2.54, 16, 0.0, False),
    "regnetx_006": (16, 48, 36.97, 2.24, 24, 0.0, False),
    "regnetx_008": (16, 56, 35.73, 2.28, 16, 0.0, False),
    "regnetx_016": (18, 80, 34.01, 2.25, 24, 0.0, False),
    "regnetx_032": (25, 88, 26.31, 2.25, 48, 0.0, False),
    "regnetx_040": (23, 96, 38.65, 2.43, 40, 0.0, True),
    "regnetx_064": (17, 184, 60.83, 2.07, 56, 0.0, False),
    "regnetx_080": (23, 80, 49.56, 2.88, 120, 0.0, False),
    "regnetx_120": (19, 168, 73.36, 2.37, 112, 0.0, False),
    "regnetx_160": (22, 216, 55.59, 2.1, 128, 0.0, False),
    "regnetx_320": (23, 320, 69.86, 2.0, 168, 0.0, False),
    "regnety_002": (13, 24, 36.44, 2.49, 8, 0.25, False),
    "regnety_004": (16, 48, 27.89, 2.09, 8, 0.25, False),
    "regnety_006": (15, 48, 32.54, 2.32, 16, 0.25, False),
    "regnety_008": (14, 56, 38.84, 2.4, 16, 0.25, True),
    "regnety_008_tv": (14, 56, 38.84, 2.4, 16, 0.25, False),
    "regnety_016": (27, 48, 20.71, 2.65, 24, 0.25, False),
    "regnety_032": (21, 80, 42.63, 2.66, 24, 0.25, False),
    "regnety_040": (22, 96, 31.41, 2.24, 64, 0.25, True),
    "regnety_064": (25, 112, 33.22, 2.27, 72, 0.25, False),
    "regnety_080": (17, 192, 76.82, 2.19, 56, 0.25, True),
    "regnety_080_tv": (17, 192, 76.82, 2.19, 56, 0.25, False),
    "regnety_120": (19, 168, 73.36, 2.37, 112, 0.25, False),
    "regnety_160": (18, 200, 106.23, 2.48, 112, 0.25, False),
    "regnety_320": (20, 232, 115.89, 2.53, 232, 0.25, False),
    "regnety_640": (20, 352, 147.48, 2.4, 328, 0.25, False),
    "regnety_1280": (27, 456, 160.83, 2.52, 264, 0.25, False),
    "regnety_2560": (27, 640, 230.83, 2.53, 373, 0.25, False),
}

# timm RegNet names our module cannot express, and why (timm's regnet.py model_cfgs).
SKIPPED_REGNETS = {
    "regnety_040_sgn": "GroupNorm of 16 channels per group (a group count that varies per layer) and SiLU",
    "regnetv_040": "pre-activation blocks (preact=True) and SiLU",
    "regnetv_064": "pre-activation blocks, an average-pool shortcut (downsample='avg') and SiLU",
    "regnetz_005": "no shortcut on downsampling blocks, linear output, bottle_ratio 4, a final 1x1 conv, SiLU",
    "regnetz_040": "no shortcut on downsampling blocks, linear output, bottle_ratio 4, SiLU",
    "regnetz_040_h": "no shortcut on downsampling blocks, linear output, bottle_ratio 4, a final 1x1 conv, SiLU",
}

# timm's ResNet variant letters (timm/models/resnet.py's ResNet docstring) and prefixes -> our `ResNet` fields.
# 't' is timm's code, a (24, 32, 64) stem (its docstring's 'tn'); 'e' (a 64-wide avg-down stem) names no model.
VARIANTS = {
    "c": {"stem_type": "deep"},  # three 3x3 convs (32, 32, 64) for the 7x7 one
    "d": {"stem_type": "deep", "avg_down": True},  # 'c' and average-pool shortcuts
    "s": {"stem_type": "deep", "stem_width": 64},  # a (64, 64, 128) deep stem
    "t": {"stem_type": "deep_tiered", "avg_down": True},  # a tiered (24, 32, 64) deep stem and avg-pool shortcuts
    # timm's SEModule after the last norm of every block: make_divisible(C / 16, 8) wide, ReLU, sigmoid gate.
    "se": {"se_ratio": 1 / 16, "se_divisor": 8},
    "gn": {"norm": "group"},  # GroupNorm of 32 groups, eps 1e-5, for every BatchNorm
}

_R18, _R34, _R101, _R152 = (2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)
# name -> (stage_sizes, basic block?, cardinality, bottleneck_width, VARIANTS keys): timm's ResNets built from
# `_create_resnet` model_args our module expresses exactly (ReLU, no anti-aliasing, no ECA, max-pool stem).
TIMM_RESNETS = {
    "resnet10t": ((1, 1, 1, 1), True, 1, 64, ("t",)),
    "resnet14t": ((1, 1, 1, 1), False, 1, 64, ("t",)),
    "resnet18": (_R18, True, 1, 64, ()),
    "resnet18d": (_R18, True, 1, 64, ("d",)),
    "resnet26": (_R18, False, 1, 64, ()),
    "resnet26d": (_R18, False, 1, 64, ("d",)),
    "resnet26t": (_R18, False, 1, 64, ("t",)),
    "resnet34": (_R34, True, 1, 64, ()),
    "resnet34d": (_R34, True, 1, 64, ("d",)),
    "resnet50": (_R34, False, 1, 64, ()),
    "resnet50c": (_R34, False, 1, 64, ("c",)),
    "resnet50d": (_R34, False, 1, 64, ("d",)),
    "resnet50s": (_R34, False, 1, 64, ("s",)),
    "resnet50t": (_R34, False, 1, 64, ("t",)),
    "resnet50_gn": (_R34, False, 1, 64, ("gn",)),
    "resnet101": (_R101, False, 1, 64, ()),
    "resnet101c": (_R101, False, 1, 64, ("c",)),
    "resnet101d": (_R101, False, 1, 64, ("d",)),
    "resnet101s": (_R101, False, 1, 64, ("s",)),
    "resnet152": (_R152, False, 1, 64, ()),
    "resnet152c": (_R152, False, 1, 64, ("c",)),
    "resnet152d": (_R152, False, 1, 64, ("d",)),
    "resnet152s": (_R152, False, 1, 64, ("s",)),
    "resnet200": ((3, 24, 36, 3), False, 1, 64, ()),
    "resnet200d": ((3, 24, 36, 3), False, 1, 64, ("d",)),
    "resnext50_32x4d": (_R34, False, 32, 4, ()),
    "resnext50d_32x4d": (_R34, False, 32, 4, ("d",)),
    "resnext101_32x4d": (_R101, False, 32, 4, ()),
    "resnext101_32x8d": (_R101, False, 32, 8, ()),
    "resnext101_32x16d": (_R101, False, 32, 16, ()),
    "resnext101_32x32d": (_R101, False, 32, 32, ()),
    "resnext101_64x4d": (_R101, False, 64, 4, ()),
    "wide_resnet50_2": (_R34, False, 1, 128, ()),
    "wide_resnet101_2": (_R101, False, 1, 128, ()),
    "seresnet18": (_R18, True, 1, 64, ("se",)),
    "seresnet34": (_R34, True, 1, 64, ("se",)),
    "seresnet50": (_R34, False, 1, 64, ("se",)),
    "seresnet50t": (_R34, False, 1, 64, ("se", "t")),
    "seresnet101": (_R101, False, 1, 64, ("se",)),
    "seresnet152": (_R152, False, 1, 64, ("se",)),
    "seresnet152d": (_R152, False, 1, 64, ("se", "d")),
    "seresnet200d": ((3, 24, 36, 3), False, 1, 64, ("se", "d")),
    "seresnet269d": ((3, 30, 48, 8), False, 1, 64, ("se", "d")),
    "seresnext26d_32x4d": (_R18, False, 32, 4, ("se", "d")),
    "seresnext26t_32x4d": (_R18, False, 32, 4, ("se", "t")),
    "seresnext50_32x4d": (_R34, False, 32, 4, ("se",)),
    "seresnext101_32x4d": (_R101, False, 32, 4, ("se",)),
    "seresnext101_32x8d": (_R101, False, 32, 8, ("se",)),
    "seresnext101d_32x8d": (_R101, False, 32, 8, ("se", "d")),
    "seresnext101_64x4d": (_R101, False, 64, 4, ("se",)),
}

# timm ResNet names (fnmatch patterns over timm.list_models(module="resnet")) our module cannot express, and why.
SKIPPED_RESNETS = {
    "eca*": "ECA attention (a 1-D conv over the pooled channels, `se.conv`) instead of SE; ecaresnet50d_pruned and "
    "ecaresnet101d_pruned also have per-layer pruned widths",
    "resnetaa*": "an average pool after the strided 3x3 conv (aa_layer): the same keys as resnet*d, other arithmetic",
    "resnetblur*": "a blur pool after the strided 3x3 conv (aa_layer=BlurPool2d)",
    "seresn*aa*": "SE with the anti-aliasing pool of resnetaa*",
    "resnetrs*": "a strided 3x3 conv-norm instead of the stem's max pool (replace_stem_pool); its SE (ratio 1/4, "
    "multiples of 8) would fit",
    "senet154": "3x3 shortcut convs (down_kernel_size=3) and half-width first 1x1 convs (block_reduce_first=2)",
    "test_resnet": "a test model mixing block types with custom channels",
}
