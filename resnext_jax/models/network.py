"""What ResNet and RegNet share: their common fields, the layers they bind, stages, the residual tail, the head.

`Network` declares the design fields both families have once; `Network.layers(train)` binds the conv and norm
definitions to the dtype, the platform and the mode, so blocks are built from definitions alone and never see
`train`. `ResidualBlock` declares the fields every block has and the small pieces each block's last unit takes:
the shortcut (projected where the shape changes), what follows the last norm (squeeze-excitation, stochastic
depth) and the last norm's scale init. Each block then reads top to bottom, as torchvision's `forward` does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.models.layers import (
    Conv2d,
    ConvNormAct,
    DropPath,
    SqueezeExcite,
    bind,
    get_activation,
    module_class,
)
from resnext_jax.models.norms import norm_layer
from resnext_jax.ops.pool import avg_pool_2x2_ceil, global_avg_pool

ModuleDef = Any


class Layers(NamedTuple):
    """The definitions a network's blocks are built from, bound to its dtype, platform and mode."""

    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    drop_path: ModuleDef
    platform: str

    @property
    def unit(self) -> ConvNormAct:
        """The conv-norm unit of these definitions (for a stem)."""
        return ConvNormAct(self.conv, self.norm, self.act)


class Network(nn.Module, kw_only=True):
    """Fields shared by `ResNet` and `RegNet` (keyword-only).

    Attributes:
      num_classes: classifier outputs; 0 drops the head (logits are the pre-logits).
      dtype: compute dtype (e.g. `jnp.bfloat16`); params and BN statistics stay float32.
      conv: the conv definition (`Conv2d`, or a `functools.partial` of it or of a compatible module).
      norm: 'batch', 'group' or 'frozen_batch' (running statistics in training too), or a norm definition
        called as `norm(name=...)(x, residual=None, act=None)`.
      norm_groups: groups of the group norm.
      bn_axis_name: mesh/pmap axis to sync batch statistics over (under shard_map); None under plain jit.
      activation: "relu", "silu" or "gelu".
      zero_init_last: zero-init the last norm scale of every residual branch.
      drop_path_rate: stochastic depth of the last block; rates increase linearly from 0 over blocks.
      se_ratio: squeeze-excitation ratio in every block; 0 disables it.
      dropout_rate: dropout before the classifier.
      small_stem: a stride-1 stem with no max-pool, for 32x32 images.
      conv_impl: grouped-conv implementation, see `resnext_jax.ops.CONV_IMPLS`.
      scan_blocks: run blocks 1..n-1 of each stage (identical shapes) under `nn.scan`, so XLA compiles
        one block per stage instead of n-1; their variables are stacked on a leading axis under
        `{stage}_rest`. Same math; convert layouts with `models.stack_blocks` / `unstack_blocks`.
      platform: the backend the model runs on ('cpu', 'gpu', 'tpu'): it picks the conv implementations and
        the native CPU kernels. None: JAX's default backend when the model is called.
    """

    num_classes: int = 1000
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv2d
    norm: str | ModuleDef = "batch"
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
    platform: str | None = None

    def layers(self, train: bool) -> Layers:
        """The conv, norm, activation and drop-path definitions every block of this network is built from."""
        platform = self.platform or jax.default_backend()
        conv = bind(self.conv, dtype=self.dtype, impl=self.conv_impl, platform=platform)
        definition = norm_layer(self.norm, self.norm_groups)
        fields = {f.name for f in dataclasses.fields(module_class(definition))}
        if train and self.bn_axis_name is not None and "use_running_average" in fields and "axis_name" not in fields:
            raise ValueError(
                f"norm {module_class(definition).__name__} keeps running statistics but has no axis_name field, so "
                f"they would not be synced over the {self.bn_axis_name!r} devices; give it an axis_name field "
                f"(as flax.linen.BatchNorm has) or use norm='batch'"
            )
        norm = bind(
            definition,
            use_running_average=not train,
            dtype=self.dtype,
            axis_name=self.bn_axis_name,
            native_epilogue=self.conv_impl in ("auto", "native"),
            platform=platform,
        )
        return Layers(
            conv, norm, get_activation(self.activation), functools.partial(DropPath, deterministic=not train), platform
        )

    def run_stages(
        self, x: jax.Array, stages: Sequence[tuple[Callable[..., nn.Module], int, int]], prefix: str
    ) -> dict:
        """Runs `(block definition, blocks, first stride)` per stage; returns {'stage1': ..., ...}."""
        rates = iter(drop_path_rates(self.drop_path_rate, sum(blocks for _, blocks, _ in stages)))
        features = {}
        for stage, (block, blocks, stride) in enumerate(stages):
            x = run_stage(
                block, x, [next(rates) for _ in range(blocks)], f"{prefix}{stage + 1}", self.scan_blocks, stride
            )
            features[f"stage{stage + 1}"] = x
        return features

    def head(self, features: dict, train: bool, return_features: bool, kernel_init: Callable | None = None):
        """Pool the last stage, dropout, the `fc` classifier; float32 logits or the whole feature dict."""
        x = global_avg_pool(features[f"stage{len(features)}"])
        features["pre_logits"] = x
        kernel_init = nn.initializers.lecun_normal() if kernel_init is None else kernel_init
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        if self.num_classes:
            x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init, name="fc")(x)
        logits = x.astype(jnp.float32)
        return {**features, "logits": logits} if return_features else logits


def se_features(channels: int, se_ratio: float, divisor: int = 1) -> int:
    """Squeeze width of a block's SE: `round(channels * se_ratio)`, or with `divisor > 1` timm's
    `make_divisible(channels * se_ratio, divisor, round_limit=0)` (seresnext*: 1/16, 8)."""
    if divisor <= 1:
        return max(1, round(channels * se_ratio))
    return max(divisor, int(channels * se_ratio + divisor / 2) // divisor * divisor)


class ResidualBlock(nn.Module, kw_only=True):
    """Fields every residual block has: its layer definitions (from `Network.layers`), stride and options.

    `avg_down`: a strided projection shortcut average-pools (2x2) first and then runs its 1x1 conv at stride 1
    (ResNet-D), instead of a strided 1x1 conv that reads one pixel in four. `se_divisor`: the SE width's
    rounding (`se_features`).

    A block is called as `block(x, drop_path_rate=None)`; `drop_path_rate`, when given, overrides the field (a
    traced per-block rate under `scan_blocks`).
    """

    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    drop_path: ModuleDef = DropPath
    strides: int = 1
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    avg_down: bool = False
    se_divisor: int = 1

    @property
    def unit(self) -> ConvNormAct:
        """The block's conv-norm unit."""
        return ConvNormAct(self.conv, self.norm, self.act)

    @property
    def last_scale_init(self) -> Callable:
        """The scale initializer of the branch's last norm: zeros with `zero_init_last` (the block starts as the
        identity on its branch), else ones."""
        return nn.initializers.zeros if self.zero_init_last else nn.initializers.ones

    def se_width(self, channels: int) -> int | None:
        """The squeeze width of an SE on `channels` (`se_features`), None without SE."""
        return se_features(channels, self.se_ratio, self.se_divisor) if self.se_ratio else None

    def shortcut(self, x: jax.Array, features: int, names: tuple[str, str] = ("downsample_conv", "downsample_bn")):
        """The block's input where the shape stays, else a strided 1x1 conv-norm named `names` (with `avg_down`, a
        2x2 average pool and then a stride-1 conv-norm); no activation."""
        if self.strides == 1 and x.shape[-1] == features:
            return x
        if self.avg_down:
            x, strides = avg_pool_2x2_ceil(x, self.strides), 1
        else:
            strides = self.strides
        return self.unit(x, features, (1, 1), strides, names=names, act=False, fuse_next=True)

    def branch_end(self, se_width: int | None, drop_path_rate=None) -> Callable | None:
        """What follows the branch's last norm, before the add: squeeze-excitation (`se`) of `se_width`, then
        stochastic depth (`drop_path`; `drop_path_rate` overrides the field). None when both are identities."""
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        drop = self.drop_path(rate, name="drop_path")
        if not se_width and drop.is_identity:
            return None

        def end(y):
            if se_width:
                y = SqueezeExcite(se_width, conv=self.conv, act=self.act, name="se")(y)
            return drop(y)

        return end


def scan_blocks(block: nn.Module, x: jax.Array, rates: Sequence[float]) -> jax.Array:
    """Applies `block` `len(rates)` times under `nn.scan`, its variables stacked on a leading axis.

    For the identical blocks 1..n-1 of a stage: XLA compiles the block once instead of n-1 times.
    Each application gets its own init and dropout RNG and its own stochastic-depth rate.
    """

    def body(module, carry, rate):
        return module(carry, drop_path_rate=rate), None

    scanned = nn.scan(
        body,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        length=len(rates),
    )
    # All-zero rates stay a static 0.0, so DropPath is skipped at trace time as in the unrolled model.
    xs = jnp.asarray(rates, jnp.float32) if any(rates) else None
    x, _ = scanned(block, x, xs)
    return x


def run_stage(
    block: Callable[..., nn.Module], x: jax.Array, rates: Sequence[float], prefix: str, scan: bool, first_stride: int
) -> jax.Array:
    """Runs one stage: block `{prefix}_0` (stride, projection), then the identical blocks 1..n-1.

    Those run one module each (`{prefix}_{i}`) or, with `scan`, as one scanned module `{prefix}_rest`.
    """
    x = block(strides=first_stride, drop_path_rate=rates[0], name=f"{prefix}_0")(x)
    if scan and len(rates) > 1:
        return scan_blocks(block(name=f"{prefix}_rest"), x, rates[1:])
    for index in range(1, len(rates)):
        x = block(drop_path_rate=rates[index], name=f"{prefix}_{index}")(x)
    return x


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Linearly increasing stochastic-depth rates, 0 for the first block and `drop_path_rate` for the last."""
    if num_blocks <= 1:
        return [drop_path_rate] * num_blocks
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]
