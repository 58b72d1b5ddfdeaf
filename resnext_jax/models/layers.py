"""Building blocks shared by the ResNet and RegNet families (NHWC throughout).

Blocks never choose a dtype, a norm or a conv implementation themselves: the
network hands them partially applied `conv`/`norm` module constructors, as the
Flax ImageNet example does.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.ops import conv2d

Dtype = Any
ModuleDef = Any

# torchvision initializes convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "gelu": nn.gelu,
}
NORMS = ("batch", "group")


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name` (relu, silu or gelu)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Conv2d(nn.Module):
    """A 2-D convolution with torch-style symmetric padding and a swappable implementation.

    The parameter layout is exactly `flax.linen.Conv(feature_group_count=groups)`'s:
    `kernel` of shape `(kh, kw, in_features // groups, features)` and an optional
    `bias` of shape `(features,)`. Only the arithmetic behind it changes with `impl`.

    Attributes:
      features: output channels.
      kernel_size: `(kh, kw)`.
      strides: `(sh, sw)`.
      padding: per-side padding; default `(k - 1) // 2`, i.e. torch's `padding=k//2` for odd k.
        Flax's `'SAME'` pads stride-2 convs asymmetrically and breaks torch parity.
      groups: channel groups (`feature_group_count`).
      use_bias: whether to add a bias.
      impl: grouped-conv implementation, one of `resnext_jax.ops.CONV_IMPLS`.
      dtype: compute dtype; params stay `param_dtype`.
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] | None = None
    groups: int = 1
    use_bias: bool = False
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels do not divide into {self.groups} groups")
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_features // self.groups, self.features),
                            self.param_dtype)
        padding = self.padding
        if padding is None:
            padding = ((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)
        dtype = self.dtype or x.dtype
        y = conv2d(x.astype(dtype), kernel.astype(dtype), strides=tuple(self.strides), padding=padding,
                   groups=self.groups, impl=self.impl)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def make_norm(kind: str, *, train: bool, dtype: Dtype, axis_name: str | None, groups: int = 32) -> ModuleDef:
    """Returns a norm-layer constructor: batch norm (torch's eps and momentum) or group norm.

    Batch statistics are reduced in float32 even when `dtype` is bfloat16, and the
    running statistics are stored in float32.
    """
    if kind == "batch":
        return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=dtype, axis_name=axis_name)
    if kind == "group":
        return functools.partial(_GroupNorm, num_groups=groups, dtype=dtype)
    raise ValueError(f"norm={kind!r} is not supported; use one of {NORMS}")


class _GroupNorm(nn.Module):
    """GroupNorm that falls back to fewer groups when the channels do not divide by `num_groups`."""
    num_groups: int = 32
    dtype: Dtype | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        groups = next(g for g in range(min(self.num_groups, channels), 0, -1) if channels % g == 0)
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, scale_init=self.scale_init,
                            name="gn")(x)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per example, scaling survivors by 1 / (1 - rate)."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with 1x1 convs (biases on), as torchvision's RegNet has it.

    Attributes:
      squeeze_features: width of the bottleneck (`fc1` output).
      conv: conv constructor; the two 1x1 convs are named `fc1` and `fc2`.
    """
    squeeze_features: int
    conv: ModuleDef
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Pool in float32 so a bf16 model averages a 56x56 map without losing digits.
        scale = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        scale = self.conv(self.squeeze_features, (1, 1), use_bias=True, name="fc1")(scale)
        scale = self.act(scale)
        scale = self.conv(x.shape[-1], (1, 1), use_bias=True, name="fc2")(scale)
        return x * nn.sigmoid(scale)


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Linearly increasing stochastic-depth rates, 0 for the first block and `drop_path_rate` for the last."""
    if num_blocks <= 1:
        return [drop_path_rate] * num_blocks
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C), averaged in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
