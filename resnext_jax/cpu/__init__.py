"""The native CPU kernels, behind one interface: `eligible`, the kernels themselves, and what ran.

`resnext_jax.ops` is the only caller: for each kernel it asks `eligible(kernel, platform, *arrays, shape_ok=...)`
and otherwise runs its pure-XLA equivalent (`KERNELS` names it), so a model computes the same function on any
backend, with or without a C++ compiler. `models/` never imports this package.

    python -m resnext_jax.cpu info    # what this machine builds, why not, and the cache
    python -m resnext_jax.cpu build   # build now (the first use would otherwise build, once per cache)

`report()` is what `environment.json`, the bench JSON and the evaluation report record: whether the kernels are
available (and why not), the build, the kernels traced into this process's computations, and why each other one
was not used.
"""

from __future__ import annotations

import jax.numpy as jnp

from resnext_jax.cpu.build import (
    BUILD,
    EPILOGUE_TARGET,
    FEW_CHANNEL_CONV_TARGET,
    FEW_CHANNEL_GRAD_TARGET,
    GRAD_TARGET,
    ISA_ENV,
    ISAS,
    MATMUL_TARGET,
    OPT_OUT,
    POOL_GRAD_TARGET,
    SOURCES,
    SUMS_TARGET,
    TARGET,
    available,
    cache_dir,
    compiler,
    cpu_flags,
    isa,
    runnable_isas,
    select_isa,
    unavailable_reason,
)
from resnext_jax.cpu.kernels import (
    FEW_CHANNELS,
    MATMUL_COLUMNS,
    MATMUL_ISAS,
    NARROW_GROUP_WIDTHS,
    USED,
    affine_add_relu,
    channel_sums,
    few_channel_conv,
    few_channel_kernel_grad,
    grouped_conv_forward,
    grouped_conv_input_grad,
    grouped_conv_kernel_grad,
    input_grad_padding,
    matmul_affine,
    matmul_preferred,
    max_pool_grad,
    supports,
    supports_few_channels,
    supports_matmul,
)

# kernel -> (what it computes, the pure-XLA code in `resnext_jax.ops` that runs where it does not).
KERNELS = {
    "grouped_conv_forward": (
        "grouped and dense 3x3 convs, forward and input gradient",
        "ops.grouped_conv: split / chunked / XLA convolutions",
    ),
    "grouped_conv_kernel_grad": ("their kernel gradient", "ops.conv_grad: plain convolutions or tap matmuls"),
    "few_channel_conv": ("the stems' 3-channel conv", "lax.conv_general_dilated"),
    "few_channel_kernel_grad": ("the stem's kernel gradient after space-to-depth", "one matmul per tap"),
    "affine_add_relu": ("batch norm + shortcut + ReLU of a residual block", "XLA elementwise ops"),
    "matmul_affine": ("inference 1x1 conv + batch norm (+ shortcut, ReLU), AVX2 builds", "XLA dot + elementwise"),
    "channel_sums": ("batch norm's training sums", "jnp.sum"),
    "max_pool_grad": ("the stem max pool's gradient", "flax.linen.max_pool's autodiff"),
}
# kernel -> why it was last refused (cleared once it is used).
_WHY_NOT: dict[str, str] = {}


def runs_on(platform: str, *arrays) -> bool:
    """Whether the kernels can take these arrays: all float32, `platform` a CPU, the kernels built."""
    return platform == "cpu" and all(a.dtype == jnp.float32 for a in arrays) and available()


def eligible(kernel: str, platform: str, *arrays, shape_ok: bool = True) -> bool:
    """Whether `kernel` runs for these arrays on `platform` (with the caller's shape condition `shape_ok`);
    when not, the reason is kept for `report()`."""
    if runs_on(platform, *arrays) and shape_ok:
        return True
    if platform != "cpu":
        why = f"{platform} backend"
    elif not available():
        why = f"unavailable: {unavailable_reason()}"
    elif any(a.dtype != jnp.float32 for a in arrays):
        why = f"{next(a.dtype for a in arrays if a.dtype != jnp.float32)} inputs (float32 only)"
    else:
        why = "shapes it does not take"
    if kernel not in USED:
        _WHY_NOT[kernel] = why
    return False


def report() -> dict:
    """The kernels' state in this process, JSON-able: available (or why not), instruction set, build, the
    kernels traced so far (`used`) and, for the others, why not."""
    ok = available()
    used = sorted(USED)
    return {
        "available": ok,
        "isa": isa(),
        "unavailable_reason": unavailable_reason(),
        "build": dict(BUILD) if ok else {},
        "used": used,
        "not_used": {
            name: (_WHY_NOT.get(name, "not needed by the computations traced") if ok else unavailable_reason())
            for name in KERNELS
            if name not in USED
        },
    }


__all__ = [
    "BUILD",
    "EPILOGUE_TARGET",
    "FEW_CHANNEL_CONV_TARGET",
    "FEW_CHANNEL_GRAD_TARGET",
    "GRAD_TARGET",
    "MATMUL_TARGET",
    "POOL_GRAD_TARGET",
    "SUMS_TARGET",
    "TARGET",
    "FEW_CHANNELS",
    "ISAS",
    "ISA_ENV",
    "KERNELS",
    "MATMUL_COLUMNS",
    "MATMUL_ISAS",
    "NARROW_GROUP_WIDTHS",
    "OPT_OUT",
    "SOURCES",
    "USED",
    "affine_add_relu",
    "available",
    "cache_dir",
    "channel_sums",
    "compiler",
    "cpu_flags",
    "eligible",
    "few_channel_conv",
    "few_channel_kernel_grad",
    "grouped_conv_forward",
    "grouped_conv_input_grad",
    "grouped_conv_kernel_grad",
    "input_grad_padding",
    "isa",
    "matmul_affine",
    "matmul_preferred",
    "max_pool_grad",
    "report",
    "runnable_isas",
    "runs_on",
    "select_isa",
    "supports",
    "supports_few_channels",
    "supports_matmul",
    "unavailable_reason",
]
