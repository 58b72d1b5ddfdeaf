"""Where torchvision weights come from: a torch Module, a state_dict (possibly wrapped by a training checkpoint), a
`.pth`/`.pt` file read with `weights_only=True`, or a torchvision weight tag; and the errors that name each case."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from resnext_jax.errors import InputError, UserError
from resnext_jax.models.registry import model_info

# Keys under which training checkpoints nest the weights ({"model": state_dict, "optimizer": ..., "epoch": ...}).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# DataParallel / DistributedDataParallel prefix every key with this.
PARALLEL_PREFIX = "module."
# torchvision weight tags ("IMAGENET1K_V2", "DEFAULT"): anything else is taken for a path.
_TAG = re.compile(r"[A-Z][A-Z0-9_]*")


class ConversionError(InputError):
    """The checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """A checkpoint path that does not exist (and is not a weight tag either)."""


class WeightsDownloadError(UserError, RuntimeError):
    """torchvision could not download a weight tag (no network); the message names the file to fetch."""


def _unwrap(state: Mapping) -> Mapping:
    """The weights inside a training checkpoint's wrapper (`WRAPPER_KEYS`), without DataParallel's "module." prefix.

    One function for files, in-memory dicts and modules, so a checkpoint loads the same however it arrives.
    """
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for key in WRAPPER_KEYS:
            if key in state and isinstance(state[key], Mapping):
                state, unwrapped = state[key], True
                break
    if state and all(isinstance(k, str) and k.startswith(PARALLEL_PREFIX) for k in state):
        state = {k[len(PARALLEL_PREFIX) :]: v for k, v in state.items()}
    return state


def load_torch_state_dict(name: str, source: Any) -> dict[str, np.ndarray]:
    """Reads `source` into a {torch key: float numpy array} dict.

    `source` is a `torch.nn.Module`, a state_dict, a path to a torch checkpoint file (read with
    `weights_only=True`, so no pickled code runs), or a torchvision weight tag such as
    "IMAGENET1K_V2" (downloaded by torchvision; needs network once). Weights nested under one of
    `WRAPPER_KEYS` (`{"model": state_dict, "epoch": ...}`) or prefixed by DataParallel's "module." are
    unwrapped, the same for a file and an in-memory dict.
    """
    if hasattr(source, "state_dict") and callable(source.state_dict):  # a torch Module, without importing torch
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    elif isinstance(source, (str, os.PathLike)):
        state = _read_file_or_tag(name, source)
    else:
        raise TypeError(
            f"source must be a torch Module, a state_dict, a .pth/.pt path or a weight tag, not {type(source).__name__}"
        )
    state = _unwrap(state)
    not_arrays = [k for k, v in state.items() if not hasattr(v, "shape") and not isinstance(v, (int, float))]
    if not_arrays:
        raise ConversionError(
            f"this is not a state_dict: {not_arrays[:8]} are not tensors. Pass the entry that holds the model's "
            f"weights (e.g. checkpoint[{not_arrays[0]!r}]); entries named {list(WRAPPER_KEYS)} are found "
            f"automatically"
        )
    return {k: _numpy(v) for k, v in state.items()}


def _numpy(value) -> np.ndarray:
    """A torch tensor or array as numpy; half-precision tensors as float32 (numpy has no bfloat16 for torch)."""
    if not hasattr(value, "detach"):
        return np.asarray(value)
    tensor = value.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def _read_file_or_tag(name: str, source: str | os.PathLike):
    """A checkpoint file if `source` exists, else a torchvision weight tag; anything else names both choices."""
    import torch

    path = os.path.expanduser(os.fspath(source))
    if os.path.isdir(path):
        raise InputError(f"{source} is a directory; pass the .pth/.pt checkpoint file inside it")
    if os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a file it cannot read
            raise InputError(
                f"cannot read {source} as a torch checkpoint ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); pass a file saved with "
                f"torch.save(model.state_dict(), path)"
            ) from error
        if not isinstance(state, Mapping):
            raise InputError(
                f"{source} holds a {type(state).__name__}, not a state_dict; save one with "
                f"torch.save(model.state_dict(), path)"
            )
        return state
    if isinstance(source, str) and _TAG.fullmatch(source):
        return _download_weights(name, source)
    raise CheckpointNotFoundError(
        f"{source} does not exist, and it is not a torchvision weight tag of {name} "
        f"(known tags: {', '.join(_known_tags(name)) or 'none'}); pass an existing checkpoint file or one of the tags"
    )


def _known_tags(name: str) -> list[str]:
    tags = list(model_info(name).weights)
    return tags + ["DEFAULT"] if tags else []


def _download_weights(name: str, tag: str):
    import torchvision

    tags = _known_tags(name)
    if tag not in tags:
        raise InputError(
            f"{name} has no torchvision weights {tag!r}; known tags: {', '.join(tags) or 'none'}, "
            f"or pass the path of a checkpoint file"
        )
    weights = torchvision.models.get_model_weights(name)[tag]
    file = weights.url.rsplit("/", 1)[-1]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # network errors come in many types
        raise WeightsDownloadError(
            f"could not download {name} {tag} from {weights.url} ({error}). On a machine with network, "
            f"download that file, copy it here and pass its path in place of {tag}: "
            f"--config.init_from=/path/{file} to train, `python -m resnext_jax.predict /path/{file} "
            f"--model {name} IMAGES` (evaluate and export alike), from_torchvision({name!r}, '/path/{file}') in Python"
        ) from error
