"""Strict, exact timm <-> Flax weight conversion for the timm names in the registry.

    variables = from_timm("regnety_032", "model.safetensors")    # or a timm Module, state_dict, .pth, a weight tag
    logits = create_model("regnety_032").apply(variables, images, train=False)
    state_dict = to_timm("regnety_032", variables)               # timm's load_state_dict(strict=True) accepts it

timm's plain ResNets have torchvision's keys; its RegNets name the same layers differently (`s1.b1.conv2.conv` is
torchvision's `trunk_output.block1.block1-0.f.b.0`, and blocks count from 1), and its ResNet variants add layers
whose names depend on the model (`downsample.1` is a norm after a strided conv, a conv after an average pool). The
name map `RULES` is the only timm-specific part: the loops, layouts and errors are shared with torchvision's
converter (`resnext_jax.convert.core`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from resnext_jax.convert.core import Library, export_state, import_state, layout_hint, state_shapes
from resnext_jax.convert.names import BN, CONV, CONV_BIAS, GN, LINEAR, KeyMap, torchvision_key_map
from resnext_jax.convert.sources import (
    CheckpointNotFoundError,
    WeightsDownloadError,
    load_torch_state_dict,
)
from resnext_jax.errors import InputError
from resnext_jax.models.pretrained import is_pretrained_tag, pretrained_config
from resnext_jax.models.registry import create_model, list_models, model_info

# The kind of a norm rule: the model's norm, BatchNorm or (norm="group") GroupNorm, whose Flax variables sit in the
# norm module's `gn` and which has no running statistics.
NORM = "norm"
DEEP_STEM = {"stem_type": ("deep", "deep_tiered")}
# (timm module prefix, Flax module path, kind, condition): a rule applies to a model whose fields have the values
# its condition allows ({field: allowed values}; None: every model). `{s}`, `{b}`, `{i}` are integers on both
# sides; `{b1}` on the timm side is the Flax `{b}` plus one (timm numbers RegNet blocks b1, b2, ...).
RULES = {
    "resnet": [
        ("conv1", "conv1", CONV, {"stem_type": ("",)}),
        # The deep stems (ResNet-C/D/S/T): conv1 is a Sequential of conv, norm, act, conv, norm, act, conv.
        ("conv1.0", "conv1_0", CONV, DEEP_STEM),
        ("conv1.1", "conv1_1", NORM, DEEP_STEM),
        ("conv1.3", "conv1_3", CONV, DEEP_STEM),
        ("conv1.4", "conv1_4", NORM, DEEP_STEM),
        ("conv1.6", "conv1_6", CONV, DEEP_STEM),
        ("bn1", "bn1", NORM, None),
        ("layer{s}.{b}.conv{i}", "layer{s}_{b}/conv{i}", CONV, None),
        ("layer{s}.{b}.bn{i}", "layer{s}_{b}/bn{i}", NORM, None),
        ("layer{s}.{b}.downsample.0", "layer{s}_{b}/downsample_conv", CONV, {"avg_down": (False,)}),
        ("layer{s}.{b}.downsample.1", "layer{s}_{b}/downsample_bn", NORM, {"avg_down": (False,)}),
        # avg_down: downsample.0 is the average pool (no parameters).
        ("layer{s}.{b}.downsample.1", "layer{s}_{b}/downsample_conv", CONV, {"avg_down": (True,)}),
        ("layer{s}.{b}.downsample.2", "layer{s}_{b}/downsample_bn", NORM, {"avg_down": (True,)}),
        ("layer{s}.{b}.se.fc{i}", "layer{s}_{b}/se/fc{i}", CONV_BIAS, None),
        ("fc", "fc", LINEAR, None),
    ],
    "regnet": [
        ("stem.conv", "stem_conv", CONV, None),
        ("stem.bn", "stem_bn", BN, None),
        ("s{s}.b{b1}.conv1.conv", "block{s}_{b}/a_conv", CONV, None),
        ("s{s}.b{b1}.conv1.bn", "block{s}_{b}/a_bn", BN, None),
        ("s{s}.b{b1}.conv2.conv", "block{s}_{b}/b_conv", CONV, None),
        ("s{s}.b{b1}.conv2.bn", "block{s}_{b}/b_bn", BN, None),
        ("s{s}.b{b1}.se.fc{i}", "block{s}_{b}/se/fc{i}", CONV_BIAS, None),
        ("s{s}.b{b1}.conv3.conv", "block{s}_{b}/c_conv", CONV, None),
        ("s{s}.b{b1}.conv3.bn", "block{s}_{b}/c_bn", BN, None),
        ("s{s}.b{b1}.downsample.conv", "block{s}_{b}/proj_conv", CONV, None),
        ("s{s}.b{b1}.downsample.bn", "block{s}_{b}/proj_bn", BN, None),
        ("head.fc", "fc", LINEAR, None),
    ],
}
HEAD = {"resnet": "fc", "regnet": "head.fc"}  # timm's classifier prefix (PretrainedCfg.classifier)
# A few keys that tell whose RegNet a state_dict is.
_TIMM_REGNET_KEYS = ("stem.conv.weight", "s1.b1.conv1.conv.weight")
_TORCHVISION_REGNET_KEYS = ("stem.0.weight", "trunk_output.block1.block1-0.f.a.0.weight")


def key_map(family: str, model: nn.Module | None) -> KeyMap:
    """timm's names for `model`'s variables: the `RULES` of `family` whose condition its fields meet, norm rules
    resolved to its norm (`model=None`: the rules without a condition, enough for a RegNet)."""
    group = getattr(model, "norm", None) == "group"
    rules = []
    for timm_prefix, flax_path, kind, condition in RULES[family]:
        if condition and not all(getattr(model, field, None) in allowed for field, allowed in condition.items()):
            continue
        if kind == NORM:
            flax_path, kind = (flax_path + "/gn", GN) if group else (flax_path, BN)
        rules.append((timm_prefix, flax_path, kind))
    return KeyMap("timm", tuple(rules), HEAD[family])


def _timm_family(name: str) -> str:
    """The family of timm name `name`; an error naming timm's name when `name` is torchvision's own."""
    info = model_info(name)
    if "timm" not in info.sources:
        twins = [n for n in _same_module(name) if "timm" in model_info(n).sources]
        hint = (
            f"timm's name for it is {twins[0]!r}: from_timm({twins[0]!r}, ...)"
            if twins
            else "resnext_jax.list_models(source='timm') lists timm's names"
        )
        raise InputError(
            f"{name} is torchvision's name, not timm's; {hint}, or from_torchvision({name!r}, ...) "
            f"for torchvision weights"
        )
    return info.family


def _same_module(name: str) -> list[str]:
    """Registered names built with the same module and fields as `name` (regnet_x_3_2gf and regnetx_032)."""
    module = create_model(name)
    return [n for n in list_models() if n != name and create_model(n) == module]


def wrong_converter_hint(family: str, state: Mapping, converter: str) -> str | None:
    """For `converter` ("from_torchvision" or "from_timm") given the other library's RegNet state_dict: the fix,
    naming the right converter and, where the stages tell, the right name; else None."""
    if family != "regnet" or not isinstance(state, Mapping):
        return None
    if converter == "from_torchvision" and any(k in state for k in _TIMM_REGNET_KEYS):
        names = layout_hint("regnet", state_shapes(key_map("regnet", None), state), "timm") or ["<timm name>"]
        return f"these are timm RegNet weights (stem.conv, s1.b1...): from_timm({names[0]!r}, ...)"
    if converter == "from_timm" and any(k in state for k in _TORCHVISION_REGNET_KEYS):
        names = layout_hint("regnet", state_shapes(torchvision_key_map("regnet"), state), "torchvision") or [
            "<torchvision name>"
        ]
        return f"these are torchvision RegNet weights (stem.0, trunk_output...): from_torchvision({names[0]!r}, ...)"
    return None


def read_timm_state(name: str, source: Any) -> dict[str, np.ndarray]:
    """`source` as {timm key: float32 numpy array}: a timm Module, a state_dict, a `.safetensors` file (read with
    safetensors: no pickle), a `.pth`/`.pt`/`.bin` file (`torch.load(weights_only=True)`) or a timm weight tag
    such as "regnety_032.ra_in1k" (downloaded from the Hugging Face hub; needs network once)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if path.endswith(".safetensors") and os.path.isfile(path):
            try:
                source = _read_safetensors(path)
            except Exception as error:  # safetensors raises SafetensorError, OSError...
                raise InputError(
                    f"cannot read {source} as a safetensors file ({type(error).__name__}: {error}); "
                    f"pass timm's model.safetensors or a state_dict file"
                ) from error
        elif not os.path.exists(path):
            source = _download_tag(name, os.fspath(source))
    return load_torch_state_dict(name, source)


def _read_safetensors(path: str) -> dict:
    """A `.safetensors` file as numpy arrays, without torch; bfloat16 tensors (which numpy lacks) through torch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, TypeError, ValueError) as error:
        if "bf16" not in str(error).lower() and "bfloat16" not in str(error).lower():
            raise
        from safetensors.torch import load_file as load_torch_file

        return load_torch_file(path, device="cpu")


def _download_tag(name: str, tag: str):
    if not is_pretrained_tag(tag):
        raise CheckpointNotFoundError(
            f"{tag} does not exist, and it is not a timm weight tag of {name} (e.g. "
            f"{pretrained_config(name).tag if name in _default_tags() else name + '.<tag>'}); pass an existing "
            f".safetensors/.pth file or a tag from resnext_jax.models.pretrained.list_pretrained({name + '.*'!r})"
        )
    cfg = pretrained_config(tag)
    if cfg.architecture != name:
        raise InputError(
            f"{tag} holds {cfg.architecture}'s weights, not {name}'s: from_timm({cfg.architecture!r}, {tag!r})"
        )
    url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    try:
        from huggingface_hub import hf_hub_download

        return read_timm_state(name, hf_hub_download(cfg.hf_hub_id, "model.safetensors"))
    except Exception as error:  # no huggingface_hub, no network, hub errors: all end the same way
        raise WeightsDownloadError(
            f"could not download timm weights {tag} ({type(error).__name__}: {_first_sentence(error)}); on "
            f"a machine with network, download {url}, copy it here and pass its path in place of {tag}: "
            f"`python -m resnext_jax.predict /path/model.safetensors --model {tag} IMAGES` (evaluate and export "
            f"alike), or from_timm({name!r}, '/path/model.safetensors') in Python"
        ) from error


def _first_sentence(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text.split(". ")[0][:120]


def _default_tags():
    from resnext_jax.models.timm_pretrained_cfgs import DEFAULT_TAGS

    return DEFAULT_TAGS


TIMM = Library(
    "timm",
    family=_timm_family,
    read=read_timm_state,
    misplaced=lambda family, state: wrong_converter_hint(family, state, "from_timm"),
    key_map=key_map,
    origin="timm.create_model({!r}) (with the same options)",
    foreign="an option this timm name does not have, such as norm='group' or stem_type='deep'?",
)


def from_timm(
    name: str,
    source: Any,
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    rng: jax.Array | None = None,
    **model_overrides,
) -> dict:
    """Converts timm weights of model `name` into Flax variables `{'params', 'batch_stats'}`.

    Strict like `from_torchvision`: every missing, unexpected or mis-shaped key is named in one `ConversionError`,
    and torchvision RegNet weights are pointed to `from_torchvision`.

    Args:
      name: a timm name we register (`resnext_jax.list_models(source="timm")`), e.g. "regnety_032".
      source: see `read_timm_state`.
      num_classes, reinit_head, rng, **model_overrides: as in `from_torchvision` (`scan_blocks=True` gives the
        stacked layout).
    """
    return import_state(
        TIMM, name, source, num_classes=num_classes, reinit_head=reinit_head, rng=rng, model_overrides=model_overrides
    )


def to_timm(name: str, variables: Mapping, **model_overrides) -> dict:
    """Converts Flax variables of timm name `name` to a timm state_dict (torch tensors) that
    `timm.create_model(name).load_state_dict(..., strict=True)` accepts.

    As strict as `from_timm`: the variables must be exactly those of `create_model(name, **model_overrides)` (the
    head size is read from them; pass `num_classes=0` for variables without a head), every problem named in one
    `ConversionError`. BatchNorm's `num_batches_tracked` is exported as 0; `scan_blocks` variables are unstacked.
    """
    return export_state(TIMM, name, variables, model_overrides)
