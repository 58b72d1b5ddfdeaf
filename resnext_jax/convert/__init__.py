"""Strict, exact torchvision <-> Flax weight conversion.

    variables = from_torchvision("resnext50_32x4d", "IMAGENET1K_V2")      # or a Module, state_dict, .pth path
    logits = create_model("resnext50_32x4d").apply(variables, images, train=False)
    state_dict = to_torchvision("resnext50_32x4d", variables)            # load_state_dict(strict=True) accepts it

The name map lives in `names.py`; torch is imported only when a function needs it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnext_jax.convert.names import (HEAD_PREFIX, LAYER_KINDS, TORCH_ONLY_BUFFERS, flax_to_torch_module,
                                       torch_to_flax_module)
from resnext_jax.models.layers import stack_blocks, unstack_blocks
from resnext_jax.models.registry import create_model, model_info

__all__ = ["from_torchvision", "to_torchvision", "load_torch_state_dict", "ConversionError"]

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""


def _to_flax(kind: str, tensor_name: str, value: np.ndarray) -> np.ndarray:
    if tensor_name == "weight" and kind.startswith("conv"):
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO; grouped (O, I/g, kh, kw) -> (kh, kw, I/g, O)
    if tensor_name == "weight" and kind == "linear":
        return value.T
    return value


def _to_torch(kind: str, tensor_name: str, value: np.ndarray) -> np.ndarray:
    if tensor_name == "weight" and kind.startswith("conv"):
        return value.transpose(3, 2, 0, 1)
    if tensor_name == "weight" and kind == "linear":
        return value.T
    return value


def load_torch_state_dict(name: str, source: Any) -> dict[str, np.ndarray]:
    """Reads `source` into a {torch key: float numpy array} dict.

    `source` is a `torch.nn.Module`, a state_dict, a path to a `.pth`/`.pt` file (read with
    `weights_only=True`, so no pickled code runs), or a torchvision weight tag such as
    "IMAGENET1K_V2" (downloaded by torchvision; needs network once).
    """
    import torch

    if isinstance(source, torch.nn.Module):
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    elif isinstance(source, (str, os.PathLike)) and (os.path.exists(source) or str(source).endswith((".pth", ".pt"))):
        if not os.path.exists(source):
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        state = torch.load(source, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
                state = state[key]
    elif isinstance(source, str):
        state = _download_weights(name, source)
    else:
        raise TypeError(f"source must be a torch Module, a state_dict, a .pth/.pt path or a weight tag, "
                        f"not {type(source).__name__}")
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in state.items()}


def _download_weights(name: str, tag: str):
    import torchvision

    tags = model_info(name).weights
    if tag not in tags and tag != "DEFAULT":
        raise ValueError(f"{name} has no torchvision weights {tag!r}; available: {list(tags) or 'none'}")
    weights = torchvision.models.get_model_weights(name)[tag]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # network errors come in many types
        raise RuntimeError(
            f"could not download {name} {tag} from {weights.url} ({error}). On a machine with network, "
            f"download that file and pass its path: from_torchvision({name!r}, '/path/to/file.pth')") from error


def _expected_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def _flax_key(family: str, torch_key: str):
    """torch key -> (flax key tuple, kind, tensor name); flax key is None for dropped buffers."""
    prefix, _, tensor_name = torch_key.rpartition(".")
    mapped = torch_to_flax_module(family, prefix)
    if mapped is None:
        return None
    path, kind = mapped
    if tensor_name in TORCH_ONLY_BUFFERS.get(kind, ()):
        return (None, kind, tensor_name)
    leaf = dict(LAYER_KINDS[kind]).get(tensor_name)
    if leaf is None:
        return None
    collection, leaf_name = leaf
    return (collection, *path.split("/"), leaf_name), kind, tensor_name


def _torch_key(family: str, flax_key: tuple[str, ...]):
    """flax key tuple -> (torch key, kind, tensor name) or None."""
    collection, *path, leaf_name = flax_key
    mapped = flax_to_torch_module(family, "/".join(path))
    if mapped is None:
        return None
    prefix, kind = mapped
    names = [t for t, leaf in LAYER_KINDS[kind] if leaf == (collection, leaf_name)]
    return (f"{prefix}.{names[0]}", kind, names[0]) if names else None


def from_torchvision(name: str, source: Any, *, num_classes: int | None = None, reinit_head: bool = False,
                     rng: jax.Array | None = None, **model_overrides) -> dict:
    """Converts torchvision weights for builder `name` into Flax variables `{'params', 'batch_stats'}`.

    Strict: every missing, unexpected or mis-shaped key is named in one `ConversionError`.

    Args:
      name: a torchvision builder name, e.g. "resnext50_32x4d".
      source: a `torch.nn.Module`, a state_dict, a `.pth`/`.pt` path or a weight tag ("IMAGENET1K_V2").
      num_classes: the head size you want; default: the checkpoint's.
      reinit_head: when `num_classes` differs from the checkpoint's head, load the backbone and
        initialize a fresh head (logged). Without it a head mismatch is an error.
      rng: key for a re-initialized head (default `jax.random.key(0)`).
      **model_overrides: other `create_model` fields that do not change the parameter layout (e.g. dtype).
        `scan_blocks=True` returns the stacked layout that `create_model(name, scan_blocks=True)` expects.
    """
    family = model_info(name).family
    state = load_torch_state_dict(name, source)
    head = HEAD_PREFIX[family]
    ckpt_classes = state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else None
    num_classes = num_classes or ckpt_classes or 1000
    drop_head = ckpt_classes is not None and num_classes != ckpt_classes
    if drop_head and not reinit_head:
        raise ConversionError(
            f"the checkpoint's head has {ckpt_classes} classes but num_classes={num_classes}; pass "
            f"reinit_head=True to load the backbone and start a new {num_classes}-class head")
    # Convert in the default (one module per block) layout, which the name map describes; stack at the end.
    scanned = model_overrides.pop("scan_blocks", False)
    model = create_model(name, num_classes=num_classes, **model_overrides)
    expected = _expected_shapes(model)

    converted, unexpected, mismatched = {}, [], []
    for torch_key, value in state.items():
        if drop_head and torch_key.startswith(head + "."):
            continue
        mapped = _flax_key(family, torch_key)
        if mapped is None:
            unexpected.append(torch_key)
            continue
        flax_key, kind, tensor_name = mapped
        if flax_key is None:
            continue
        if flax_key not in expected:
            unexpected.append(torch_key)
            continue
        array = _to_flax(kind, tensor_name, np.asarray(value, dtype=np.float32))
        if array.shape != expected[flax_key]:
            mismatched.append(f"{torch_key}: checkpoint {tuple(value.shape)} -> {array.shape}, "
                              f"model wants {expected[flax_key]} at {'/'.join(flax_key)}")
            continue
        converted[flax_key] = array
    missing = [k for k in expected if k not in converted and not (drop_head and k[1] == head)]
    if missing or unexpected or mismatched:
        missing_names = [(_torch_key(family, k) or ("/".join(k),))[0] for k in missing]
        lines = [f"cannot load this checkpoint into {name}:"]
        lines += [f"  missing key: {k}" for k in missing_names]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k}" for k in mismatched]
        raise ConversionError("\n".join(lines))
    variables = {k: jnp.asarray(v) for k, v in converted.items()}
    if drop_head:
        log.warning("%s: checkpoint head has %d classes; re-initialized a new %d-class head '%s'",
                    name, ckpt_classes, num_classes, head)
        fresh = model.init(rng if rng is not None else jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
        for k, v in traverse_util.flatten_dict(fresh).items():
            if k[1] == head:
                variables[k] = v
    variables = traverse_util.unflatten_dict(variables)
    return stack_blocks(variables) if scanned else variables


def to_torchvision(name: str, variables: Mapping) -> dict:
    """Converts Flax variables of builder `name` to a torchvision state_dict (torch tensors).

    torchvision's `load_state_dict(strict=True)` accepts the result. BatchNorm's
    `num_batches_tracked`, which Flax does not keep, is exported as 0. Variables of a
    `scan_blocks=True` model (stacked `layer{s}_rest` / `block{s}_rest`) are unstacked first.
    """
    import torch

    family = model_info(name).family
    state, unmapped = {}, []
    for flax_key, value in traverse_util.flatten_dict(unstack_blocks(variables)).items():
        mapped = _torch_key(family, flax_key)
        if mapped is None:
            unmapped.append("/".join(flax_key))
            continue
        torch_key, kind, tensor_name = mapped
        state[torch_key] = torch.from_numpy(np.array(_to_torch(kind, tensor_name, np.asarray(value))))
        for buffer in TORCH_ONLY_BUFFERS.get(kind, ()):
            state[torch_key.rpartition(".")[0] + "." + buffer] = torch.tensor(0, dtype=torch.long)
    if unmapped:
        raise ConversionError(f"{name}: these variables have no torchvision counterpart (a non-torchvision "
                              f"option such as se_ratio or norm='group'?): {unmapped}")
    return state
