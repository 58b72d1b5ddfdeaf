"""One way to create a model's variables: random initialization from a zero NHWC batch, or just its shapes.

    variables = init_variables(model, jax.random.key(0), image_size=224)   # {'params', 'batch_stats'}
    shapes = variable_shapes(model, image_size=224)                      # the same tree of ShapeDtypeStructs

The models' variables do not depend on the input size (global average pooling precedes the classifier), so any
`image_size` gives the same tree; training initializes at its configured size and the tools at a small one.
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp


def input_shape(image_size: int | tuple[int, int], batch: int = 1) -> tuple[int, int, int, int]:
    """The (batch, height, width, 3) NHWC shape for `image_size`: one side of a square, or (height, width)."""
    if isinstance(image_size, numbers.Integral):
        sides = (image_size, image_size)
    else:
        sides = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(sides) != 2 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in (*sides, batch)
    ):
        raise ValueError(
            f"image_size={image_size!r}, batch={batch!r} is not an input size; use a positive number of "
            f"pixels (224) or a (height, width) pair such as (224, 160), and a batch of at least 1"
        )
    return (int(batch), int(sides[0]), int(sides[1]), 3)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int | tuple[int, int] = 224, batch: int = 1) -> dict:
    """Random-initializes `model`'s variables ({'params', 'batch_stats'}; no 'batch_stats' with group norm).

    Traces `model.init` on a (batch, H, W, 3) zero batch in inference mode and runs it under `jax.jit`, so
    the initializers run as one compiled program instead of op by op.
    """
    shape = input_shape(image_size, batch)
    return jax.jit(lambda r: model.init(r, jnp.zeros(shape), train=False))(rng)


def variable_shapes(model: nn.Module, image_size: int | tuple[int, int] = 224, batch: int = 1) -> dict:
    """The tree `init_variables` returns, as `jax.ShapeDtypeStruct`s: traced with `jax.eval_shape`, nothing is
    computed or allocated (for parameter counts, FLOP counts and ahead-of-time compilation)."""
    shape = input_shape(image_size, batch)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
