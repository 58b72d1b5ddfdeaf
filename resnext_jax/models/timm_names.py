"""timm's model names that our modules express exactly, from timm's own design parameters (timm 1.0.31).

timm's RegNets are built by `timm/models/regnet.py` from `model_cfgs`; the X and Y ones with a plain conv1x1
shortcut, no pre-activation and no linear output are our `RegNet` with other key names. Two rounding rules
exist: torchvision's (`_make_divisible`, round half up and never more than 10% down), which timm uses only for its
`*_tv` names (`group_min_ratio=0.9`), and timm's own `quantize_float` (Python's round, half to even). They give
different widths for five names (regnetx_004, regnetx_040, regnety_008, regnety_040, regnety_080: a stage width
whose bottleneck is an odd multiple of half the group width); `timm_regnet_widths` is timm's rule, which those
five build with (`RegNet(width_rounding="timm")`).

timm's plain ResNets (7x7 stem, conv1x1 shortcut, no attention or anti-aliasing) have torchvision's keys and
arithmetic; where timm and torchvision share a name it is one registry entry.
"""
from __future__ import annotations

from resnext_jax.models.regnet import regnet_widths

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

# name -> (stage_sizes, basic block?, cardinality, bottleneck_width): timm's plain ResNets (timm/models/resnet.py:
# stem_type '', avg_down False, no attn_layer, no aa_layer, BatchNorm, ReLU).
TIMM_RESNETS = {
    "resnet18": ((2, 2, 2, 2), True, 1, 64),
    "resnet26": ((2, 2, 2, 2), False, 1, 64),
    "resnet34": ((3, 4, 6, 3), True, 1, 64),
    "resnet50": ((3, 4, 6, 3), False, 1, 64),
    "resnet101": ((3, 4, 23, 3), False, 1, 64),
    "resnet152": ((3, 8, 36, 3), False, 1, 64),
    "resnet200": ((3, 24, 36, 3), False, 1, 64),
    "resnext50_32x4d": ((3, 4, 6, 3), False, 32, 4),
    "resnext101_32x4d": ((3, 4, 23, 3), False, 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), False, 32, 8),
    "resnext101_32x16d": ((3, 4, 23, 3), False, 32, 16),
    "resnext101_32x32d": ((3, 4, 23, 3), False, 32, 32),
    "resnext101_64x4d": ((3, 4, 23, 3), False, 64, 4),
    "wide_resnet50_2": ((3, 4, 6, 3), False, 1, 128),
    "wide_resnet101_2": ((3, 4, 23, 3), False, 1, 128),
}

# timm ResNet families that need model changes (in progress elsewhere), by what they add.
SKIPPED_RESNETS = {
    "ResNet-C/D/S/T (resnet50c, resnet50d, resnet50s, resnet50t, resnet10t, resnet14t, resnet18d, resnet26d, "
    "resnet26t, resnet34d, resnet101c/d/s, resnet152c/d/s, resnet200d, resnext50d_32x4d)":
        "deep 3x3 stem (conv1.0/.1/.3/.4/.6 then bn1) and, for D/T, an average-pool shortcut (downsample.1 conv, "
        "downsample.2 bn)",
    "SE and ECA (seresnet*, seresnext*, senet154, ecaresnet*, ecaresnext*, resnetrs*)":
        "squeeze-excitation after the last norm of each block (se.fc1/se.fc2 with biases), or ECA's 1-D conv",
    "resnet50_gn": "GroupNorm (bn1.weight/bias without running statistics)",
    "anti-aliased (resnetaa*, resnetblur*, seresnetaa50d, seresnextaa*)":
        "an average or blur pool after the strided 3x3 conv: the same keys as resnet50, different arithmetic",
    "test_resnet": "a test model with mixed block types and channels",
}


def timm_regnet_widths(depth: int, w_0: float, w_a: float, w_m: float, group_width: int,
                       bottleneck_multiplier: float = 1.0) -> tuple[list[int], list[int], list[int]]:
    """`(stage_widths, stage_depths, group_widths)` as timm's `RegNet._get_stage_args` computes them.

    The per-block widths are torchvision's float32 arithmetic (`regnet_widths`); only the group-compatibility
    rounding differs: timm's `quantize_float`, `int(round(bottleneck / group) * group)` with Python's round
    (half to even) and no 10% floor, where torchvision rounds half up and never loses more than 10%.
    """
    # group_width=1 makes torchvision's compatibility step the identity: the quantized stage widths come back.
    widths, depths, _ = regnet_widths(depth, w_0, w_a, w_m, 1, 1.0)
    bottleneck = [int(w * bottleneck_multiplier) for w in widths]
    group_widths = [min(group_width, b) for b in bottleneck]
    bottleneck = [int(round(b / g) * g) for b, g in zip(bottleneck, group_widths)]
    return [int(b / bottleneck_multiplier) for b in bottleneck], depths, group_widths
