"""The input check every model runs first: a wrong layout or an empty training batch is one clear error, not a Flax
shape error about a `(7, 7, 224, 64)` kernel or BatchNorm statistics silently set to NaN."""

from __future__ import annotations

import flax.linen as nn
import jax

from resnext_jax.errors import InputError


def check_images(module: nn.Module, x: jax.Array, train: bool, stem: str) -> None:
    """Raises InputError unless `x` is an NHWC batch the model's stem conv `stem` takes.

    Shapes are static, so this costs nothing at run time. At init, where the stem has no kernel yet, an input
    that looks channels-first (`(N, 1 or 3, H, W)` with W > 4) is refused too: it would build a model for W channels.
    """
    shape = tuple(x.shape)
    if len(shape) != 4:
        hint = "; add the batch axis with x[None]" if len(shape) == 3 else ""
        raise InputError(f"images must be a 4-D NHWC batch (batch, height, width, channels); got shape {shape}{hint}")
    kernel = (
        module.variables.get("params", {}).get(stem, {}).get("kernel") if module.has_variable("params", stem) else None
    )
    expected = None if kernel is None else kernel.shape[2]
    if shape[-1] != expected and (expected is not None or (shape[1] in (1, 3) and shape[-1] > 4)):
        channels = expected or 3
        if shape[1] == channels:
            fix = "it looks channels-first (NCHW): pass x.transpose(0, 2, 3, 1)"
        elif shape[-1] == 1 and channels == 3:
            fix = "for grayscale images repeat the channel: jnp.repeat(x, 3, axis=-1)"
        else:
            fix = f"give images with {channels} channels last"
        raise InputError(f"the model takes NHWC images with {channels} channels; got shape {shape}: {fix}")
    if train and shape[0] == 0:
        raise InputError(
            "an empty batch (0 images) in training would set every BatchNorm running statistic to NaN; "
            "skip empty batches"
        )
