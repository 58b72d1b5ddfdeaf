"""RegNetX / RegNetY generated from the design-space parameters, exactly as torchvision builds them.

`regnet_widths` reproduces torchvision's `BlockParams.from_init_params`, including its
float32 arithmetic, the quantization to multiples of 8 and the group-compatibility
adjustment, so every shape matches a torchvision checkpoint.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import numpy as np

from resnext_jax.models.checks import check_images
from resnext_jax.models.layers import SqueezeExcite
from resnext_jax.models.network import Network, ResidualBlock


def _make_divisible(value: float, divisor: int) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10%
        new_value += divisor
    return new_value


ROUNDINGS = ("torchvision", "timm")


def regnet_widths(
    depth: int,
    w_0: float,
    w_a: float,
    w_m: float,
    group_width: int,
    bottleneck_multiplier: float = 1.0,
    rounding: str = "torchvision",
) -> tuple[list[int], list[int], list[int]]:
    """Returns `(stage_widths, stage_depths, group_widths)` for a RegNet design point.

    Mirrors torchvision's computation in float32 (torch's default dtype), so that rounding ties break the same
    way. Only the last step, rounding each stage's bottleneck to a multiple of its group width, differs between the
    libraries: torchvision's `_make_divisible` rounds half up and never loses more than 10%; timm's
    `quantize_float` (`rounding="timm"`, timm's own RegNets but not its `*_tv` ones) uses Python's round (half to
    even) with no floor. Five of timm's RegNets come out different.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"width_rounding={rounding!r}; use one of {ROUNDINGS}")
    quant = 8
    widths_cont = np.arange(depth, dtype=np.float32) * np.float32(w_a) + np.float32(w_0)
    block_capacity = np.round(np.log(widths_cont / np.float32(w_0)) / np.float32(math.log(w_m)))
    block_widths = (
        (np.round(np.float32(w_0) * np.power(np.float32(w_m), block_capacity) / np.float32(quant)) * quant)
        .astype(np.int32)
        .tolist()
    )
    boundaries = [i for i in range(depth + 1) if i == 0 or i == depth or block_widths[i] != block_widths[i - 1]]
    stage_widths = [block_widths[i] for i in boundaries[:-1]]
    stage_depths = np.diff(boundaries).tolist()
    # Make each stage's bottleneck width divisible by its group width (torchvision's compatibility fix).
    bottleneck = [int(w * bottleneck_multiplier) for w in stage_widths]
    group_widths = [min(group_width, w) for w in bottleneck]
    if rounding == "timm":
        bottleneck = [int(round(w / g) * g) for w, g in zip(bottleneck, group_widths)]
    else:
        bottleneck = [_make_divisible(w, g) for w, g in zip(bottleneck, group_widths)]
    stage_widths = [int(w / bottleneck_multiplier) for w in bottleneck]
    return stage_widths, stage_depths, group_widths


def regnet_bottleneck_width(width_out: int, bottleneck_multiplier: float) -> int:
    """Channels of a RegNet block's grouped 3x3 conv: `round(width_out * bottleneck_multiplier)`."""
    return int(round(width_out * bottleneck_multiplier))


class RegNetBlock(ResidualBlock):
    """torchvision's ResBottleneckBlock: 1x1 `a` -> grouped 3x3 `b` (stride) -> optional SE -> 1x1 `c`."""

    width_out: int
    group_width: int
    bottleneck_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, drop_path_rate: float | jax.Array | None = None) -> jax.Array:
        width_b = regnet_bottleneck_width(self.width_out, self.bottleneck_multiplier)
        y = self.unit(x, width_b, (1, 1), names=("a_conv", "a_bn"))
        y = self.unit(
            y,
            width_b,
            (3, 3),
            self.strides,
            width_b // self.group_width,
            names=("b_conv", "b_bn"),
            fuse_next=not self.se_ratio,
        )
        if self.se_ratio:  # torchvision squeezes relative to the block's *input* width
            y = SqueezeExcite(int(round(self.se_ratio * x.shape[-1])), conv=self.conv, act=self.act, name="se")(y)
        return self.unit(  # c, [drop path], + shortcut (proj), act
            y,
            self.width_out,
            (1, 1),
            names=("c_conv", "c_bn"),
            residual=lambda: self.shortcut(x, self.width_out, names=("proj_conv", "proj_bn")),
            post=self.branch_end(None, drop_path_rate),
            scale_init=self.last_scale_init,
        )


class RegNet(Network):
    """RegNetX (no SE) and RegNetY (SE 0.25) from the design-space parameters (NHWC float input).

    Same call convention and options as `ResNet`: float32 logits, or a feature dict with
    `return_features=True` (`stage1`..`stage4` at strides 4, 8, 16, 32, `pre_logits`, `logits`).

    Attributes:
      depth, w_0, w_a, w_m, group_width, bottleneck_multiplier: the design-space parameters.
      se_ratio: 0 for RegNetX, 0.25 for RegNetY.
      stem_width: stem output channels (32 in torchvision).
      width_rounding: "torchvision" or "timm" (see `regnet_widths`): the
        two round a stage's bottleneck to its group width differently, which changes five of timm's RegNets.
      Shared fields: see `Network`; with `scan_blocks` the stacked blocks live under `block{s}_rest`.
    """

    depth: int
    w_0: float
    w_a: float
    w_m: float
    group_width: int
    bottleneck_multiplier: float = 1.0
    stem_width: int = 32
    width_rounding: str = "torchvision"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        check_images(self, x, train, stem="stem_conv")
        layers = self.layers(train)
        x = x.astype(self.dtype)
        x = layers.unit(x, self.stem_width, (3, 3), 1 if self.small_stem else 2, names=("stem_conv", "stem_bn"))
        block = functools.partial(
            RegNetBlock,
            conv=layers.conv,
            norm=layers.norm,
            act=layers.act,
            drop_path=layers.drop_path,
            bottleneck_multiplier=self.bottleneck_multiplier,
            se_ratio=self.se_ratio,
            zero_init_last=self.zero_init_last,
        )
        stages = [
            (functools.partial(block, width_out=width, group_width=group_width), num_blocks, 2)
            for width, num_blocks, group_width in zip(*self.widths())
        ]
        features = self.run_stages(x, stages, "block")
        # torchvision initializes the RegNet head with normal(0, 0.01) and zero bias.
        return self.head(features, train, return_features, kernel_init=nn.initializers.normal(0.01))

    def widths(self) -> tuple[list[int], list[int], list[int]]:
        """`(stage_widths, stage_depths, group_widths)` of this design point, rounded as `width_rounding` says."""
        return regnet_widths(
            self.depth, self.w_0, self.w_a, self.w_m, self.group_width, self.bottleneck_multiplier, self.width_rounding
        )

    def stage_specs(self) -> list[dict]:
        """Per-stage design: blocks, groups, bottleneck (3x3) width and output channels."""
        specs = []
        for stage, (width, num_blocks, group_width) in enumerate(zip(*self.widths())):
            width_b = regnet_bottleneck_width(width, self.bottleneck_multiplier)
            specs.append(
                dict(
                    name=f"block{stage + 1}",
                    blocks=num_blocks,
                    groups=width_b // group_width,
                    bottleneck_width=width_b,
                    out_channels=width,
                )
            )
        return specs
