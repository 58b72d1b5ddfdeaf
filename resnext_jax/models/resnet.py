"""ResNet, ResNeXt and Wide ResNet (torchvision's V1.5 layout: stride on the 3x3 conv).

One generic `ResNet` takes the block class and the stage sizes; every builder is a `functools.partial` of it
(see `registry.py`). Module names follow torchvision's (`conv1`, `bn1`, `layer2_0/conv2`, `fc`) so the
converter's name map reads one-to-one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from resnext_jax.models.checks import check_images
from resnext_jax.models.network import Network, ResidualBlock, se_features  # noqa: F401 (se_features lived here)
from resnext_jax.ops.pool import max_pool_3x3s2

ModuleDef = Any


STEM_TYPES = ("", "deep", "deep_tiered")


def bottleneck_width(filters: int, base_width: int, cardinality: int) -> int:
    """Channels of a bottleneck's grouped 3x3 conv, as torchvision computes them:
    `int(filters * base_width / 64) * cardinality`."""
    return int(filters * (base_width / 64.0)) * cardinality


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (resnet18/34). `cardinality` and `bottleneck_width` must keep their defaults."""

    filters: int
    cardinality: int = 1
    bottleneck_width: int = 64
    expansion = 1

    @staticmethod
    def inner_width(filters: int, base_width: int, cardinality: int) -> int:
        """The width of the block's inner conv (its first 3x3): `filters`."""
        return filters

    @nn.compact
    def __call__(self, x: jax.Array, drop_path_rate: float | jax.Array | None = None) -> jax.Array:
        if self.cardinality != 1 or self.bottleneck_width != 64:
            raise ValueError("BasicBlock only supports cardinality=1 and bottleneck_width=64 (as torchvision)")
        out = self.filters * self.expansion
        y = self.unit(x, self.filters, (3, 3), self.strides, names=("conv1", "bn1"))  # conv1, bn1, act
        return self.unit(  # conv2, bn2, [se, drop path], + shortcut (downsample), act
            y,
            out,
            (3, 3),
            names=("conv2", "bn2"),
            residual=lambda: self.shortcut(x, out),
            post=self.branch_end(self.se_width(out), drop_path_rate),
            scale_init=self.last_scale_init,
        )


class Bottleneck(ResidualBlock):
    """1x1 -> grouped 3x3 (stride here) -> 1x1 with 4x expansion (resnet50+, ResNeXt, Wide ResNet).

    Attributes:
      filters: the stage's base width; the block outputs `4 * filters` channels.
      cardinality: groups of the 3x3 conv.
      bottleneck_width: channels per group at `filters=64` (`bottleneck_width()` gives the 3x3 width).
    """

    filters: int
    cardinality: int = 1
    bottleneck_width: int = 64
    expansion = 4

    @staticmethod
    def inner_width(filters: int, base_width: int, cardinality: int) -> int:
        """The width of the grouped 3x3 conv (`bottleneck_width()`)."""
        return bottleneck_width(filters, base_width, cardinality)

    @nn.compact
    def __call__(self, x: jax.Array, drop_path_rate: float | jax.Array | None = None) -> jax.Array:
        width = self.inner_width(self.filters, self.bottleneck_width, self.cardinality)
        out = self.filters * self.expansion
        y = self.unit(x, width, (1, 1), names=("conv1", "bn1"))  # conv1, bn1, act
        y = self.unit(y, width, (3, 3), self.strides, self.cardinality, names=("conv2", "bn2"), fuse_next=True)
        return self.unit(  # conv3, bn3, [se, drop path], + shortcut (downsample), act
            y,
            out,
            (1, 1),
            names=("conv3", "bn3"),
            residual=lambda: self.shortcut(x, out),
            post=self.branch_end(self.se_width(out), drop_path_rate),
            scale_init=self.last_scale_init,
        )


class ResNet(Network):
    """Generic ResNet / ResNeXt / Wide ResNet on NHWC float images.

    `model.apply(variables, images, train=False)` returns float32 logits `(N, num_classes)`.
    With `return_features=True` it returns a dict with `stage1`..`stage4` (strides 4, 8, 16, 32;
    1, 2, 4, 8 with `small_stem`), `pre_logits` `(N, C)` and `logits`.

    Attributes:
      stage_sizes: blocks per stage, e.g. `(3, 4, 6, 3)`.
      block_cls: `BasicBlock`, `Bottleneck`, or any `ResidualBlock` with their fields (`filters`, ...) and their
        `expansion` and `inner_width` (for `stage_specs`).
      cardinality: groups of each bottleneck's 3x3 conv (ResNeXt's C).
      bottleneck_width: channels per group at the first stage (ResNeXt's d; 64 for ResNet, 128 for Wide).
      num_filters: base width of the first stage (and the 7x7 stem's output).
      stem_type: '' (one 7x7/2 conv), 'deep' (three 3x3 convs of `stem_width`, `stem_width`, `2 * stem_width`
        channels, the first strided: ResNet-C/D) or 'deep_tiered' (`3 * (stem_width // 4)`, `stem_width`,
        `2 * stem_width`); timm's names `conv1_0`, `conv1_1`, `conv1_3`, `conv1_4`, `conv1_6`, then `bn1`.
      stem_width: width of a deep stem's first convs.
      avg_down: average-pool shortcuts (ResNet-D, see `ResidualBlock`).
      se_divisor: SE width rounding (`se_features`; 8 for timm's SE-ResNeXts).
      Shared fields (dtype, norm, conv, scan_blocks, ...): see `Network`; with `scan_blocks` the stacked
      blocks live under `layer{s}_rest`.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    cardinality: int = 1
    bottleneck_width: int = 64
    num_filters: int = 64
    stem_type: str = ""
    stem_width: int = 32
    avg_down: bool = False
    se_divisor: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        check_images(self, x, train, stem="conv1")
        layers = self.layers(train)
        x = x.astype(self.dtype)
        if self.small_stem:
            x = layers.unit(x, self.num_filters, (3, 3), names=("conv1", "bn1"))
        elif self.stem_type:
            if self.stem_type not in STEM_TYPES:
                raise ValueError(f"stem_type={self.stem_type!r}; use one of {STEM_TYPES}")
            first = 3 * (self.stem_width // 4) if self.stem_type == "deep_tiered" else self.stem_width
            x = layers.unit(x, first, (3, 3), 2, names=("conv1_0", "conv1_1"))
            x = layers.unit(x, self.stem_width, (3, 3), names=("conv1_3", "conv1_4"))
            x = layers.unit(x, 2 * self.stem_width, (3, 3), names=("conv1_6", "bn1"))
            x = max_pool_3x3s2(x, differentiable=train, platform=layers.platform)
        else:
            x = layers.unit(x, self.num_filters, (7, 7), 2, names=("conv1", "bn1"))
            x = max_pool_3x3s2(x, differentiable=train, platform=layers.platform)
        stages = []
        for stage, num_blocks in enumerate(self.stage_sizes):
            block = functools.partial(
                self.block_cls,
                filters=self.num_filters * 2**stage,
                conv=layers.conv,
                norm=layers.norm,
                act=layers.act,
                drop_path=layers.drop_path,
                cardinality=self.cardinality,
                bottleneck_width=self.bottleneck_width,
                se_ratio=self.se_ratio,
                zero_init_last=self.zero_init_last,
                avg_down=self.avg_down,
                se_divisor=self.se_divisor,
            )
            stages.append((block, num_blocks, 2 if stage > 0 else 1))
        features = self.run_stages(x, stages, "layer")
        # torchvision's ResNet head keeps nn.Linear's default init; lecun_normal has the same variance scale.
        return self.head(features, train, return_features)

    def stage_specs(self) -> list[dict]:
        """Per-stage design: blocks, groups, bottleneck (3x3) width and output channels."""
        specs = []
        for stage, num_blocks in enumerate(self.stage_sizes):
            filters = self.num_filters * 2**stage
            width = self.block_cls.inner_width(filters, self.bottleneck_width, self.cardinality)
            out = filters * self.block_cls.expansion
            specs.append(
                dict(
                    name=f"layer{stage + 1}",
                    blocks=num_blocks,
                    groups=self.cardinality,
                    bottleneck_width=width,
                    out_channels=out,
                )
            )
        return specs
