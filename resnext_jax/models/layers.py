"""The layers every network here is built from (NHWC throughout): conv, the conv-norm unit, SE, drop path
(the norms are in `models.norms`).

Networks never hard-wire a layer: they take `conv` and `norm` module definitions, as the Flax ImageNet example
does, and bind the compute dtype, the platform and the training mode to them (`Network.layers`). A block builds
its convs and norms through `ConvNormAct`, which keeps torchvision's parameter names (`conv1`, `bn1`, ...) and
hides the fusions the native CPU kernels make between a conv, its norm, a shortcut and a ReLU
(`resnext_jax.ops.fusion`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.ops import conv2d
from resnext_jax.ops.conv_grad import conv2d_canonical_grad
from resnext_jax.ops.fusion import (
    Deferred,
    DeferredConv,
    materialize,
    matmul_conv_applies,
)
from resnext_jax.ops.grouped_conv import resolve_impl

Dtype = Any
ModuleDef = Any

# torchvision initializes convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "gelu": nn.gelu,
}


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
      canonical_grad: compute the backward pass with `ops.conv_grad.conv2d_canonical_grad`; None: on CPU.
      platform: the backend it runs on ('cpu', 'gpu', 'tpu'); None: JAX's default backend.
      dtype: compute dtype; params stay `param_dtype`.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] | None = None
    groups: int = 1
    use_bias: bool = False
    impl: str = "auto"
    canonical_grad: bool | None = None
    platform: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array | Deferred, defer: bool = False) -> jax.Array | DeferredConv:
        """The conv of `x` (or of a `Deferred` norm's output); with `defer=True`, a dense 1x1 conv that
        `ops.fusion.matmul_conv_applies` to is returned as a `DeferredConv` for the norm after it
        (`ConvNormAct` does this)."""
        deferred_input = x if isinstance(x, Deferred) else None
        if deferred_input is not None:
            x = deferred_input.x
        in_features = x.shape[-1]
        if in_features % self.groups:
            raise ValueError(f"{self.name}: {in_features} input channels do not divide into {self.groups} groups")
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, in_features // self.groups, self.features), self.param_dtype
        )
        padding = self.padding
        if padding is None:
            padding = ((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)
        dtype = self.dtype or x.dtype
        padding = tuple(map(tuple, padding))
        platform = self.platform or jax.default_backend()
        canonical = platform == "cpu" if self.canonical_grad is None else self.canonical_grad
        inputs = x

        def compute() -> jax.Array:
            x = materialize(deferred_input) if deferred_input is not None else inputs
            # A 'gemm' conv's autodiff backward is already matmuls, which XLA:CPU handles well, scanned or not.
            if canonical and resolve_impl(self.impl, self.groups, (kh, kw), platform=platform) != "gemm":
                y = conv2d_canonical_grad(
                    x.astype(dtype),
                    kernel.astype(dtype),
                    tuple(self.strides),
                    padding,
                    self.groups,
                    self.impl,
                    platform,
                )
            else:
                y = conv2d(
                    x.astype(dtype),
                    kernel.astype(dtype),
                    strides=tuple(self.strides),
                    padding=padding,
                    groups=self.groups,
                    impl=self.impl,
                    platform=platform,
                )
            if self.use_bias:
                bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                y = y + bias.astype(dtype)
            return y

        if (
            defer
            and (kh, kw) == (1, 1)
            and self.groups == 1
            and not self.use_bias
            and padding == ((0, 0), (0, 0))
            and self.impl in ("auto", "native")
            and matmul_conv_applies(x, kernel, dtype, platform)
        ):
            sh, sw = self.strides
            prologue = None
            if deferred_input is not None:
                d = deferred_input
                prologue = (d.multiplier, d.bias - d.mean * d.multiplier, d.relu)
            return DeferredConv(x[:, ::sh, ::sw, :], kernel.reshape(kernel.shape[2:]), compute, prologue)
        return compute()


def module_class(definition: ModuleDef) -> type:
    """The module class behind a definition (a class, or `functools.partial`s of one)."""
    while isinstance(definition, functools.partial):
        definition = definition.func
    return definition


def bind(definition: ModuleDef, **fields) -> ModuleDef:
    """`definition` with those of `fields` that its module class has and that it does not set itself (so one call
    binds any conv or norm, and `functools.partial(Conv2d, impl="gemm")` keeps its impl)."""
    cls, given = definition, set()
    while isinstance(cls, functools.partial):
        given |= set(cls.keywords)
        cls = cls.func
    names = {f.name for f in dataclasses.fields(cls)} - given
    return functools.partial(definition, **{k: v for k, v in fields.items() if k in names})


@functools.cache
def _takes_residual(cls: type) -> bool:
    """Whether a norm class is called as ours are, `norm(x, residual=..., act=..., defer=...)`; a plain Flax norm
    (`nn.GroupNorm`, `nn.LayerNorm`...) is called on `x` alone and the unit adds and activates."""
    return "residual" in inspect.signature(cls.__call__).parameters


@dataclasses.dataclass(frozen=True)
class ConvNormAct:
    """The conv-norm unit of every block: `act(norm(conv(x)) + residual)`, its modules named as torchvision's.

    Not a module of its own: the conv and the norm it creates belong to the block that calls it, under the
    names it is given (`names=("conv1", "bn1")`), so parameter trees keep torchvision's layout. On a CPU with the
    native kernels the unit fuses what XLA:CPU would run as separate passes (`resnext_jax.ops.fusion`): a 1x1
    conv with its norm, shortcut and ReLU, a norm into the next 1x1 conv's input (`fuse_next`), the shortcut's
    norm into the residual add. Everywhere else it computes exactly conv, norm, add, act.
    """

    conv: ModuleDef
    norm: ModuleDef
    act: Callable | None = nn.relu

    def __call__(
        self,
        x,
        features: int,
        kernel_size: Sequence[int] = (1, 1),
        strides: int = 1,
        groups: int = 1,
        *,
        names: tuple[str, str],
        act: bool = True,
        residual: jax.Array | Callable | None = None,
        post: Callable | None = None,
        fuse_next: bool = False,
        scale_init: Callable | None = None,
    ):
        """Args:
        x: the input (an array, or the previous unit's output).
        features, kernel_size, strides, groups: the conv's.
        names: the conv's and the norm's module names.
        act: apply the unit's activation (after the residual add).
        residual: added before the activation: an array, or a function returning it (called after the conv,
          so a shortcut branch is traced between the conv and its norm).
        post: applied to the normalized output before the residual add (squeeze-excitation, stochastic depth);
          it then receives a plain array.
        fuse_next: the output goes only to the next unit's 1x1 conv (or is this block's shortcut): on a CPU with
          the native kernels, at inference, the norm may then be applied by that conv as it reads its input.
        scale_init: the norm's scale initializer (zero for a block's last norm with `zero_init_last`).
        """
        conv_name, norm_name = names
        y = self.conv(features, tuple(kernel_size), (strides, strides), groups=groups, name=conv_name)(x, defer=True)
        if callable(residual):
            residual = residual()
        norm = self.norm(name=norm_name, **({} if scale_init is None else {"scale_init": scale_init}))
        activation = self.act if act else None
        if not _takes_residual(module_class(self.norm)):
            norm, post = _plain(norm), post or (lambda value: value)
        if post is None:
            return norm(y, residual=residual, act=activation, defer=fuse_next)
        y = post(norm(y))
        y = y if residual is None else materialize(residual) + y
        return activation(y) if activation is not None else y


def _plain(norm: nn.Module) -> Callable:
    """A plain Flax norm called on a materialized input (the unit then adds the residual and activates)."""
    return lambda y: norm(materialize(y))


def _static_zero(rate) -> bool:
    """A rate of 0 known at trace time (a scanned, traced rate never is)."""
    return isinstance(rate, (int, float)) and rate == 0.0


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per example, scaling survivors by 1 / (1 - rate).

    `rate` may be a traced scalar (a per-block rate scanned in by `scan_blocks`). `deterministic` (inference)
    keeps every branch.
    """

    rate: float | jax.Array = 0.0
    deterministic: bool = False

    @property
    def is_identity(self) -> bool:
        """Whether it returns its input unchanged whatever the batch: inference, or a static rate of 0."""
        return self.deterministic or _static_zero(self.rate)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or _static_zero(self.rate):
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with 1x1 convs (biases on), as torchvision's RegNet has it.

    Attributes:
      squeeze_features: width of the bottleneck (`fc1` output).
      conv: conv definition; the two 1x1 convs are named `fc1` and `fc2`.
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
