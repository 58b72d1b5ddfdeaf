"""Checks a run makes before it allocates anything: does the first step's activation memory fit this machine?

`image_size=100000` used to be accepted, write config.json, and then be killed by the kernel's OOM killer inside
the model's initialization, with no message. The estimate here is rough on purpose (it only has to catch sizes
that cannot possibly fit): the bytes of every layer's output for one image, traced with `jax.eval_shape` (nothing
is computed or allocated), times the per-process batch, times `BACKWARD_FACTOR` for the gradients the backward pass
holds beside the saved activations.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.training.config import ConfigError

# The backward pass keeps each saved activation and builds a gradient of about the same size beside it.
BACKWARD_FACTOR = 2.0


def activation_bytes_per_image(model, image_size: int) -> int:
    """The summed bytes of every module's output for one (1, image_size, image_size, 3) image, from shapes alone."""
    shape = (1, image_size, image_size, 3)

    def forward():
        return model.init_with_output(
            jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False, capture_intermediates=True
        )

    _, variables = jax.eval_shape(forward)
    leaves = jax.tree.leaves(variables.get("intermediates", {}))
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def available_memory() -> tuple[int | None, str]:
    """(bytes the local devices can hold, what that is), or (None, why) when it cannot be told."""
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available host memory"
        except OSError:
            pass
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
        if pages:
            return pages * os.sysconf("SC_PAGE_SIZE"), "available host memory"
        return None, "host memory unknown"
    try:
        limits = [device.memory_stats()["bytes_limit"] for device in devices]
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return None, "device memory unknown"
    return int(sum(limits)), f"memory of {len(devices)} {devices[0].platform.upper()} device(s)"


def check_image_size_fits(model, image_size: int, local_batch: int, available: int | None = None) -> None:
    """Raises a one-line ConfigError when the first train step's estimated activations exceed the memory of this
    process's devices (or `available` bytes), naming the estimate and the largest image size that would fit."""
    what = "the given memory"
    if available is None:
        available, what = available_memory()
        if available is None:
            return
    per_image = activation_bytes_per_image(model, image_size)
    needed = per_image * local_batch * BACKWARD_FACTOR
    if needed <= available:
        return
    # Activations grow with the pixel count, so the size that fits scales with the square root.
    fits = int(image_size * math.sqrt(available / needed)) // 8 * 8
    raise ConfigError(
        f"config.image_size={image_size} needs about {_gib(needed)} of activation memory in the first step "
        f"(estimate: {_gib(per_image)} of layer outputs per image x batch {local_batch} x {BACKWARD_FACTOR:g} for "
        f"the backward pass), but this machine has {_gib(available)} ({what}); use --config.image_size="
        f"{max(fits, 8)} or less, or a smaller batch_size"
    )


def _gib(count: float) -> str:
    value, unit = (count / 2**30, "GiB") if count < 2**40 else (count / 2**40, "TiB")
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
