"""RegNetX / RegNetY generated from the design-space parameters, exactly as torchvision builds them.

`regnet_widths` reproduces torchvision's `BlockParams.from_init_params`, including its
float32 arithmetic, the quantization to multiples of 8 and the group-compatibility
adjustment, so every shape matches a torchvision checkpoint.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.models.checks import check_images
from resnext_jax.models.layers import (DropPath, SqueezeExcite, classifier_head, drop_path_rates, materialize,
                                       run_stage, stem_and_block_factories)

ModuleDef = Any


def _make_divisible(value: float, divisor: int) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10%
        new_value += divisor
    return new_value


def regnet_widths(depth: int, w_0: float, w_a: float, w_m: float, group_width: int,
                  bottleneck_multiplier: float = 1.0) -> tuple[list[int], list[int], list[int]]:
    """Returns `(stage_widths, stage_depths, group_widths)` for a RegNet design point.

    Mirrors torchvision's computation in float32 (torch's default dtype), so that
    rounding ties break the same way.
    """
    quant = 8
    widths_cont = np.arange(depth, dtype=np.float32) * np.float32(w_a) + np.float32(w_0)
    block_capacity = np.round(np.log(widths_cont / np.float32(w_0)) / np.float32(math.log(w_m)))
    block_widths = (np.round(np.float32(w_0) * np.power(np.float32(w_m), block_capacity) / np.float32(quant))
                    * quant).astype(np.int32).tolist()
    boundaries = [i for i in range(depth + 1)
                  if i == 0 or i == depth or block_widths[i] != block_widths[i - 1]]
    stage_widths = [block_widths[i] for i in boundaries[:-1]]
    stage_depths = np.diff(boundaries).tolist()
    # Make each stage's bottleneck width divisible by its group width (torchvision's compatibility fix).
    bottleneck = [int(w * bottleneck_multiplier) for w in stage_widths]
    group_widths = [min(group_width, w) for w in bottleneck]
    bottleneck = [_make_divisible(w, g) for w, g in zip(bottleneck, group_widths)]
    stage_widths = [int(w / bottleneck_multiplier) for w in bottleneck]
    return stage_widths, stage_depths, group_widths


class RegNetBlock(nn.Module):
    """torchvision's ResBottleneckBlock: 1x1 `a` -> grouped 3x3 `b` (stride) -> optional SE -> 1x1 `c`."""
    width_out: int
    group_width: int
    conv: ModuleDef
    norm: ModuleDef
    act: Any
    strides: int = 1
    bottleneck_multiplier: float = 1.0
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, drop_path_rate: float | jax.Array | None = None) -> jax.Array:
        """`drop_path_rate`, when given, overrides the field (a traced per-block rate under `scan_blocks`)."""
        width_in = x.shape[-1]
        width_b = int(round(self.width_out * self.bottleneck_multiplier))
        groups = width_b // self.group_width
        y = self.norm(name="a_bn")(self.conv(width_b, (1, 1), name="a_conv")(x, defer=True), act=self.act)
        y = self.conv(width_b, (3, 3), (self.strides, self.strides), groups=groups, name="b_conv")(y)
        y = self.norm(name="b_bn")(y, act=self.act, defer=not self.se_ratio)
        if self.se_ratio:
            # torchvision squeezes relative to the block's *input* width.
            y = SqueezeExcite(int(round(self.se_ratio * width_in)), conv=self.conv, act=self.act, name="se")(y)
        y = self.conv(self.width_out, (1, 1), name="c_conv")(y, defer=True)
        scale_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        residual = x
        if width_in != self.width_out or self.strides != 1:
            residual = self.conv(self.width_out, (1, 1), (self.strides, self.strides), name="proj_conv")(x, defer=True)
            residual = self.norm(name="proj_bn")(residual, defer=True)
        norm = self.norm(name="c_bn", scale_init=scale_init)
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        if not train or isinstance(rate, (int, float)) and rate == 0.0:
            # No stochastic depth: the add and the activation go into the norm (fused with it in training).
            return norm(y, residual=residual, act=self.act)
        y = DropPath(rate, name="drop_path")(norm(y), deterministic=not train)
        return self.act(materialize(residual) + y)


class RegNet(nn.Module):
    """RegNetX (no SE) and RegNetY (SE 0.25) from the design-space parameters (NHWC float input).

    Same call convention and options as `ResNet`: float32 logits, or a feature dict with
    `return_features=True` (`stage1`..`stage4` at strides 4, 8, 16, 32, `pre_logits`, `logits`).

    Attributes:
      depth, w_0, w_a, w_m, group_width, bottleneck_multiplier: the design-space parameters.
      se_ratio: 0 for RegNetX, 0.25 for RegNetY.
      stem_width: stem output channels (32 in torchvision).
      scan_blocks: as in `ResNet`; the stacked blocks live under `block{s}_rest`.
      Other fields: as in `ResNet`.
    """
    depth: int
    w_0: float
    w_a: float
    w_m: float
    group_width: int
    bottleneck_multiplier: float = 1.0
    se_ratio: float = 0.0
    stem_width: int = 32
    num_classes: int = 1000
    dtype: Any = jnp.float32
    norm: str = "batch"
    norm_groups: int = 32
    bn_axis_name: str | None = None
    activation: str = "relu"
    zero_init_last: bool = False
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    small_stem: bool = False
    conv_impl: str = "auto"
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        check_images(self, x, train, stem="stem_conv")
        conv, norm, act = stem_and_block_factories(self, train)
        x = x.astype(self.dtype)
        stem_stride = 1 if self.small_stem else 2
        x = conv(self.stem_width, (3, 3), (stem_stride, stem_stride), name="stem_conv")(x)
        x = norm(name="stem_bn")(x, act=act)
        widths, depths, group_widths = regnet_widths(self.depth, self.w_0, self.w_a, self.w_m, self.group_width,
                                                     self.bottleneck_multiplier)
        rates = iter(drop_path_rates(self.drop_path_rate, sum(depths)))
        features = {}
        for stage, (width, num_blocks, group_width) in enumerate(zip(widths, depths, group_widths)):
            block = functools.partial(RegNetBlock, width_out=width, group_width=group_width, conv=conv, norm=norm,
                                      act=act, bottleneck_multiplier=self.bottleneck_multiplier,
                                      se_ratio=self.se_ratio, zero_init_last=self.zero_init_last)
            x = run_stage(block, x, [next(rates) for _ in range(num_blocks)], train, f"block{stage + 1}",
                          self.scan_blocks, first_stride=2)
            features[f"stage{stage + 1}"] = x
        # torchvision initializes the RegNet head with normal(0, 0.01) and zero bias.
        return classifier_head(self, features, train, return_features, kernel_init=nn.initializers.normal(0.01))

    def stage_specs(self) -> list[dict]:
        """Per-stage design: blocks, groups, bottleneck (3x3) width and output channels."""
        widths, depths, group_widths = regnet_widths(self.depth, self.w_0, self.w_a, self.w_m, self.group_width,
                                                     self.bottleneck_multiplier)
        specs = []
        for stage, (width, num_blocks, group_width) in enumerate(zip(widths, depths, group_widths)):
            width_b = int(round(width * self.bottleneck_multiplier))
            specs.append(dict(name=f"block{stage + 1}", blocks=num_blocks, groups=width_b // group_width,
                              bottleneck_width=width_b, out_channels=width))
        return specs
