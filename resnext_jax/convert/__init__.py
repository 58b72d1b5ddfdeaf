"""Strict, exact torchvision <-> Flax weight conversion.

    variables = from_torchvision("resnext50_32x4d", "IMAGENET1K_V2")      # or a Module, state_dict, .pth path
    logits = create_model("resnext50_32x4d").apply(variables, images, train=False)
    state_dict = to_torchvision("resnext50_32x4d", variables)            # load_state_dict(strict=True) accepts it

The name map lives in `names.py` (timm's in `timm.py`), the loops both libraries share in `core.py`; torch is
imported only when a function needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from resnext_jax.convert.core import Library, export_state, import_state
from resnext_jax.convert.names import torchvision_key_map
from resnext_jax.convert.sources import (  # noqa: F401
    CheckpointNotFoundError,
    ConversionError,
    WeightsDownloadError,
    load_torch_state_dict,
)
from resnext_jax.convert.timm import from_timm, to_timm, wrong_converter_hint
from resnext_jax.models.registry import model_info

__all__ = [
    "CheckpointNotFoundError",
    "ConversionError",
    "from_timm",
    "from_torchvision",
    "load_torch_state_dict",
    "to_timm",
    "to_torchvision",
]

TORCHVISION = Library(
    "torchvision",
    family=lambda name: model_info(name).family,
    read=load_torch_state_dict,
    misplaced=lambda family, state: wrong_converter_hint(family, state, "from_torchvision"),
    key_map=lambda family, model: torchvision_key_map(family),
    origin="torchvision's {} (built with the same options)",
    foreign="a non-torchvision option such as se_ratio or norm='group'?",
)


def from_torchvision(
    name: str,
    source: Any,
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    rng: jax.Array | None = None,
    **model_overrides,
) -> dict:
    """Converts torchvision weights for builder `name` into Flax variables `{'params', 'batch_stats'}`.

    Strict: every missing, unexpected or mis-shaped key is named once in one `ConversionError`.

    Args:
      name: a torchvision builder name, e.g. "resnext50_32x4d".
      source: a `torch.nn.Module`, a state_dict, a checkpoint file path or a weight tag ("IMAGENET1K_V2"); see
        `load_torch_state_dict`.
      num_classes: the head size you want; default: the checkpoint's. 0 means no head (features only, as
        `create_model(name, num_classes=0)`): the checkpoint's head is dropped, and a checkpoint without a head
        loads.
      reinit_head: when `num_classes` > 0 differs from the checkpoint's head, load the backbone and
        initialize a fresh head (logged). Without it a head mismatch is an error.
      rng: key for a re-initialized head (default `jax.random.key(0)`).
      **model_overrides: other `create_model` fields that do not change the parameter layout (e.g. dtype).
        `scan_blocks=True` returns the stacked layout that `create_model(name, scan_blocks=True)` expects.
    """
    return import_state(
        TORCHVISION,
        name,
        source,
        num_classes=num_classes,
        reinit_head=reinit_head,
        rng=rng,
        model_overrides=model_overrides,
    )


def to_torchvision(name: str, variables: Mapping, **model_overrides) -> dict:
    """Converts Flax variables of builder `name` to a torchvision state_dict (torch tensors).

    As strict as `from_torchvision`: the variables must be exactly those of `create_model(name, **model_overrides)`
    (the head size is read from the variables; pass `num_classes=0` for variables without a head, which a
    torchvision model whose `fc` is `nn.Identity()` loads), and every missing, unexpected or mis-shaped variable
    is named in one
    `ConversionError`, so torchvision's `load_state_dict(strict=True)` accepts every result. BatchNorm's
    `num_batches_tracked`, which Flax does not keep, is exported as 0. Variables of a `scan_blocks=True` model
    (stacked `layer{s}_rest` / `block{s}_rest`) are unstacked first.
    """
    return export_state(TORCHVISION, name, variables, model_overrides)
