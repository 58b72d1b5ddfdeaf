"""ResNet, ResNeXt and Wide ResNet (torchvision's V1.5 layout: stride on the 3x3 conv).

One generic `ResNet` takes the block class and the stage sizes; every torchvision
builder is a `functools.partial` of it (see `registry.py`). Module names follow
torchvision's (`conv1`, `bn1`, `layer2_0/conv2`, `fc`) so the converter's name map
reads one-to-one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.models.checks import check_images
from resnext_jax.models.layers import (DropPath, SqueezeExcite, classifier_head, drop_path_rates, run_stage,
                                       materialize, stem_and_block_factories, stem_max_pool)

ModuleDef = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (resnet18/34). `cardinality` and `bottleneck_width` must keep their defaults."""
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    cardinality: int = 1
    bottleneck_width: int = 64
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, drop_path_rate: float | jax.Array | None = None) -> jax.Array:
        if self.cardinality != 1 or self.bottleneck_width != 64:
            raise ValueError("BasicBlock only supports cardinality=1 and bottleneck_width=64 (as torchvision)")
        y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
        y = self.norm(name="bn1")(y, act=self.act)
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        return _merge(self, x, y, "bn2", train, drop_path_rate)


class Bottleneck(nn.Module):
    """1x1 -> grouped 3x3 (stride here) -> 1x1 with 4x expansion (resnet50+, ResNeXt, Wide ResNet).

    Attributes:
      filters: the stage's base width; the block outputs `4 * filters` channels.
      cardinality: groups of the 3x3 conv.
      bottleneck_width: channels per group at `filters=64`; the 3x3 width is
        `int(filters * bottleneck_width / 64) * cardinality`, as torchvision computes it.
    """
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: int = 1
    cardinality: int = 1
    bottleneck_width: int = 64
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, drop_path_rate: float | jax.Array | None = None) -> jax.Array:
        width = int(self.filters * (self.bottleneck_width / 64.0)) * self.cardinality
        y = self.conv(width, (1, 1), name="conv1")(x, defer=True)
        y = self.norm(name="bn1")(y, act=self.act)
        y = self.conv(width, (3, 3), (self.strides, self.strides), groups=self.cardinality, name="conv2")(y)
        y = self.norm(name="bn2")(y, act=self.act, defer=True)
        y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y, defer=True)
        return _merge(self, x, y, "bn3", train, drop_path_rate)


def _last_scale_init(zero: bool):
    return nn.initializers.zeros if zero else nn.initializers.ones


def _merge(block, x, y, norm_name, train, drop_path_rate=None):
    """The last norm, optional SE, stochastic depth, projection shortcut, add, activation (both blocks).

    Without SE and stochastic depth the add and the activation go into the last norm (fused with it in
    training). `drop_path_rate`, when given, overrides the block's field (a traced per-block rate under
    `scan_blocks`).
    """
    out_features = block.filters * block.expansion
    residual = x
    if block.strides != 1 or x.shape[-1] != out_features:
        residual = block.conv(out_features, (1, 1), (block.strides, block.strides), name="downsample_conv")(x, defer=True)
        residual = block.norm(name="downsample_bn")(residual, defer=True)
    norm = block.norm(name=norm_name, scale_init=_last_scale_init(block.zero_init_last))
    rate = block.drop_path_rate if drop_path_rate is None else drop_path_rate
    if not block.se_ratio and (not train or isinstance(rate, (int, float)) and rate == 0.0):
        return norm(y, residual=residual, act=block.act)
    y = norm(y)
    if block.se_ratio:
        y = SqueezeExcite(max(1, round(out_features * block.se_ratio)), conv=block.conv, act=block.act,
                          name="se")(y)
    y = DropPath(rate, name="drop_path")(y, deterministic=not train)
    return block.act(materialize(residual) + y)


class ResNet(nn.Module):
    """Generic ResNet / ResNeXt / Wide ResNet on NHWC float images.

    `model.apply(variables, images, train=False)` returns float32 logits `(N, num_classes)`.
    With `return_features=True` it returns a dict with `stage1`..`stage4` (strides 4, 8, 16, 32;
    1, 2, 4, 8 with `small_stem`), `pre_logits` `(N, C)` and `logits`.

    Attributes:
      stage_sizes: blocks per stage, e.g. `(3, 4, 6, 3)`.
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: classifier outputs; 0 drops the head (logits are the pre-logits).
      cardinality: groups of each bottleneck's 3x3 conv (ResNeXt's C).
      bottleneck_width: channels per group at the first stage (ResNeXt's d; 64 for ResNet, 128 for Wide).
      num_filters: base width of the first stage.
      dtype: compute dtype (e.g. `jnp.bfloat16`); params and BN statistics stay float32.
      norm: "batch" or "group" (for small per-device batches).
      norm_groups: groups of the group norm.
      bn_axis_name: mesh/pmap axis to sync batch statistics over (under shard_map); None under plain jit.
      activation: "relu", "silu" or "gelu".
      zero_init_last: zero-init the last norm scale of every residual branch.
      drop_path_rate: stochastic depth of the last block; rates increase linearly from 0 over blocks.
      se_ratio: squeeze-excitation ratio in every block; 0 disables it (torchvision has none).
      dropout_rate: dropout before the classifier.
      small_stem: a 3x3 stride-1 stem with no max-pool, for 32x32 images.
      conv_impl: grouped-conv implementation, see `resnext_jax.ops.CONV_IMPLS`.
      scan_blocks: run blocks 1..n-1 of each stage (identical shapes) under `nn.scan`, so XLA compiles
        one block per stage instead of n-1; their variables are stacked on a leading axis under
        `layer{s}_rest`. Same math; convert layouts with `models.stack_blocks` / `unstack_blocks`.
    """
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    cardinality: int = 1
    bottleneck_width: int = 64
    num_filters: int = 64
    dtype: Any = jnp.float32
    norm: str = "batch"
    norm_groups: int = 32
    bn_axis_name: str | None = None
    activation: str = "relu"
    zero_init_last: bool = False
    drop_path_rate: float = 0.0
    se_ratio: float = 0.0
    dropout_rate: float = 0.0
    small_stem: bool = False
    conv_impl: str = "auto"
    scan_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        check_images(self, x, train, stem="conv1")
        conv, norm, act = stem_and_block_factories(self, train)
        x = x.astype(self.dtype)
        if self.small_stem:
            x = conv(self.num_filters, (3, 3), name="conv1")(x)
            x = norm(name="bn1")(x, act=act)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), name="conv1")(x)
            x = norm(name="bn1")(x, act=act)
            x = stem_max_pool(x, train)
        rates = iter(drop_path_rates(self.drop_path_rate, sum(self.stage_sizes)))
        features = {}
        for stage, num_blocks in enumerate(self.stage_sizes):
            block = functools.partial(
                self.block_cls, filters=self.num_filters * 2 ** stage, conv=conv, norm=norm, act=act,
                cardinality=self.cardinality, bottleneck_width=self.bottleneck_width, se_ratio=self.se_ratio,
                zero_init_last=self.zero_init_last)
            x = run_stage(block, x, [next(rates) for _ in range(num_blocks)], train, f"layer{stage + 1}",
                          self.scan_blocks, first_stride=2 if stage > 0 else 1)
            features[f"stage{stage + 1}"] = x
        # torchvision's ResNet head keeps nn.Linear's default init; lecun_normal has the same variance scale.
        return classifier_head(self, features, train, return_features)

    def stage_specs(self) -> list[dict]:
        """Per-stage design: blocks, groups, bottleneck (3x3) width and output channels."""
        specs = []
        for stage, num_blocks in enumerate(self.stage_sizes):
            filters = self.num_filters * 2 ** stage
            if self.block_cls is BasicBlock:
                width, out = filters, filters
            else:
                width = int(filters * (self.bottleneck_width / 64.0)) * self.cardinality
                out = filters * Bottleneck.expansion
            specs.append(dict(name=f"layer{stage + 1}", blocks=num_blocks, groups=self.cardinality,
                              bottleneck_width=width, out_channels=out))
        return specs
