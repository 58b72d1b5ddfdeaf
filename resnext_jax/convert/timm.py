"""Strict, exact timm <-> Flax weight conversion for the timm names in the registry.

    variables = from_timm("regnety_032", "model.safetensors")    # or a timm Module, state_dict, .pth, a weight tag
    logits = create_model("regnety_032").apply(variables, images, train=False)
    state_dict = to_timm("regnety_032", variables)               # timm's load_state_dict(strict=True) accepts it

timm's plain ResNets have torchvision's keys; its RegNets name the same layers differently (`s1.b1.conv2.conv` is
torchvision's `trunk_output.block1.block1-0.f.b.0`, and blocks count from 1). The name map `RULES` is the only
timm-specific part: the layouts, shapes and errors are the torchvision converter's (`resnext_jax.convert`).
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnext_jax import convert as _tv
from resnext_jax.convert.names import (
    BN,
    CONV,
    CONV_BIAS,
    LAYER_KINDS,
    LINEAR,
    TORCH_ONLY_BUFFERS,
)
from resnext_jax.convert.sources import (
    CheckpointNotFoundError,
    ConversionError,
    WeightsDownloadError,
    load_torch_state_dict,
)
from resnext_jax.errors import InputError
from resnext_jax.models.pretrained import is_pretrained_tag, pretrained_config
from resnext_jax.models.registry import create_model, list_models, model_info

# (timm module prefix, Flax module path, kind). `{s}`, `{b}`, `{i}` are integers on both sides; `{b1}` on the timm
# side is the Flax `{b}` plus one (timm numbers RegNet blocks b1, b2, ...). Variants add their own rules here once
# the modules exist, e.g. a ResNet-D deep stem `conv1.{0,3,6}` (convs) and `conv1.{1,4}` (norms) before `bn1`, its
# average-pool shortcut `layer{s}.{b}.downsample.{1,2}` (conv, norm: the rule for a plain `downsample.1` must then
# not apply), SE `layer{s}.{b}.se.fc{i}` (CONV_BIAS) and group norm (weight and bias only: `GN_KIND`).
RULES = {
    "resnet": [
        ("conv1", "conv1", CONV),
        ("bn1", "bn1", BN),
        ("layer{s}.{b}.conv{i}", "layer{s}_{b}/conv{i}", CONV),
        ("layer{s}.{b}.bn{i}", "layer{s}_{b}/bn{i}", BN),
        ("layer{s}.{b}.downsample.0", "layer{s}_{b}/downsample_conv", CONV),
        ("layer{s}.{b}.downsample.1", "layer{s}_{b}/downsample_bn", BN),
        ("fc", "fc", LINEAR),
    ],
    "regnet": [
        ("stem.conv", "stem_conv", CONV),
        ("stem.bn", "stem_bn", BN),
        ("s{s}.b{b1}.conv1.conv", "block{s}_{b}/a_conv", CONV),
        ("s{s}.b{b1}.conv1.bn", "block{s}_{b}/a_bn", BN),
        ("s{s}.b{b1}.conv2.conv", "block{s}_{b}/b_conv", CONV),
        ("s{s}.b{b1}.conv2.bn", "block{s}_{b}/b_bn", BN),
        ("s{s}.b{b1}.se.fc{i}", "block{s}_{b}/se/fc{i}", CONV_BIAS),
        ("s{s}.b{b1}.conv3.conv", "block{s}_{b}/c_conv", CONV),
        ("s{s}.b{b1}.conv3.bn", "block{s}_{b}/c_bn", BN),
        ("s{s}.b{b1}.downsample.conv", "block{s}_{b}/proj_conv", CONV),
        ("s{s}.b{b1}.downsample.bn", "block{s}_{b}/proj_bn", BN),
        ("head.fc", "fc", LINEAR),
    ],
}
HEAD = {"resnet": "fc", "regnet": "head.fc"}  # timm's classifier prefix (PretrainedCfg.classifier)
FLAX_HEAD = "fc"
GN_KIND = [("weight", ("params", "scale")), ("bias", ("params", "bias"))]
KINDS = {**LAYER_KINDS, "gn": GN_KIND}
# A few keys that tell whose RegNet a state_dict is.
_TIMM_REGNET_KEYS = ("stem.conv.weight", "s1.b1.conv1.conv.weight")
_TORCHVISION_REGNET_KEYS = ("stem.0.weight", "trunk_output.block1.block1-0.f.a.0.weight")


@functools.cache
def _compile(template: str) -> re.Pattern:
    """`s{s}.b{b1}.conv1.conv` -> a regex with one named group per field; numbers without leading zeros, so that
    every key has one spelling and a round trip gives it back."""
    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile("^" + re.sub(r"{(\w+)}", r"(?P<\1>0|[1-9]\\d*)", escaped) + "$")


def _translate(family: str, path: str, side: int):
    """A module path on side `side` (0 = timm, 1 = Flax) -> (the other side's path, kind), or None."""
    for rule in RULES[family]:
        match = _compile(rule[side]).match(path)
        if not match:
            continue
        fields = {k: int(v) for k, v in match.groupdict().items()}
        if "b1" in fields:
            fields["b"] = fields["b1"] - 1
        elif "b" in fields:
            fields["b1"] = fields["b"] + 1
        if fields.get("b", 0) < 0:
            return None  # timm's block b0 does not exist
        return rule[1 - side].format(**fields), rule[2]
    return None


def flax_key(family: str, timm_key):
    """timm key -> (Flax key tuple or None for a dropped buffer, kind, tensor name), or None if unknown."""
    if not isinstance(timm_key, str):
        return None
    prefix, _, tensor_name = timm_key.rpartition(".")
    mapped = _translate(family, prefix, 0)
    if mapped is None:
        return None
    path, kind = mapped
    if tensor_name in TORCH_ONLY_BUFFERS.get(kind, ()):
        return None, kind, tensor_name
    leaf = dict(KINDS[kind]).get(tensor_name)
    if leaf is None:
        return None
    return (leaf[0], *path.split("/"), leaf[1]), kind, tensor_name


def timm_key(family: str, key: tuple[str, ...]):
    """Flax key tuple -> (timm key, kind, tensor name), or None if it has no timm counterpart."""
    if len(key) < 3:
        return None
    collection, *path, leaf_name = key
    mapped = _translate(family, "/".join(path), 1)
    if mapped is None:
        return None
    prefix, kind = mapped
    names = [t for t, leaf in KINDS[kind] if leaf == (collection, leaf_name)]
    return (f"{prefix}.{names[0]}", kind, names[0]) if names else None


def _name_and_shape(family: str, key: tuple[str, ...], shape: tuple[int, ...]) -> str:
    mapped = timm_key(family, key)
    if mapped is None:
        return f"{'/'.join(key)} {tuple(shape)}"
    return f"{mapped[0]} {_tv._torch_shape(mapped[1], mapped[2], shape)}"


def _timm_family(name: str) -> str:
    """The family of timm name `name`; an error naming timm's name when `name` is torchvision's own."""
    info = model_info(name)
    if "timm" not in info.sources:
        twins = [n for n in _same_module(name) if "timm" in model_info(n).sources]
        hint = f"timm's name for it is {twins[0]!r}: from_timm({twins[0]!r}, ...)" if twins else \
            "resnext_jax.list_models(source='timm') lists timm's names"
        raise InputError(f"{name} is torchvision's name, not timm's; {hint}, or from_torchvision({name!r}, ...) "
                         f"for torchvision weights")
    return info.family


def _same_module(name: str) -> list[str]:
    """Registered names built with the same module and fields as `name` (regnet_x_3_2gf and regnetx_032)."""
    module = create_model(name)
    return [n for n in list_models() if n != name and create_model(n) == module]


def _layout_hint(family: str, shapes: Mapping, source: str) -> list[str]:
    """Registered `source` names whose stages match the Flax-layout `shapes` (the torchvision converter's test),
    narrowed to those whose every variable matches where some do (RegNetX and Y share their stages)."""
    names = _tv._builders_with_layout(family, shapes, source)
    exact = [n for n in names if _tv._expected_shapes(create_model(n)) == dict(shapes)]
    return exact or names


def wrong_converter_hint(family: str, state: Mapping, converter: str) -> str | None:
    """For `converter` ("from_torchvision" or "from_timm") given the other library's RegNet state_dict: the fix,
    naming the right converter and, where the stages tell, the right name; else None."""
    if family != "regnet" or not isinstance(state, Mapping):
        return None
    if converter == "from_torchvision" and any(k in state for k in _TIMM_REGNET_KEYS):
        shapes = {m[0]: _tv._flax_shape(m[1], m[2], np.shape(v)) for k, v in state.items()
                  if (m := flax_key("regnet", k)) and m[0]}
        names = _layout_hint("regnet", shapes, "timm") or ["<timm name>"]
        return f"these are timm RegNet weights (stem.conv, s1.b1...): from_timm({names[0]!r}, ...)"
    if converter == "from_timm" and any(k in state for k in _TORCHVISION_REGNET_KEYS):
        shapes = {m[0]: _tv._flax_shape(m[1], m[2], np.shape(v)) for k, v in state.items()
                  if (m := _tv._flax_key("regnet", k)) and m[0]}
        names = _layout_hint("regnet", shapes, "torchvision") or ["<torchvision name>"]
        return f"these are torchvision RegNet weights (stem.0, trunk_output...): from_torchvision({names[0]!r}, ...)"
    return None


def read_timm_state(name: str, source: Any) -> dict[str, np.ndarray]:
    """`source` as {timm key: float32 numpy array}: a timm Module, a state_dict, a `.safetensors` file (read with
    safetensors: no pickle), a `.pth`/`.pt`/`.bin` file (`torch.load(weights_only=True)`) or a timm weight tag
    such as "regnety_032.ra_in1k" (downloaded from the Hugging Face hub; needs network once)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if path.endswith(".safetensors") and os.path.isfile(path):
            from safetensors.torch import load_file
            try:
                source = load_file(path, device="cpu")
            except Exception as error:  # safetensors raises SafetensorError, OSError...
                raise InputError(f"cannot read {source} as a safetensors file ({type(error).__name__}: {error}); "
                                 f"pass timm's model.safetensors or a state_dict file") from error
        elif not os.path.exists(path):
            source = _download_tag(name, os.fspath(source))
    return load_torch_state_dict(name, source)


def _download_tag(name: str, tag: str):
    if not is_pretrained_tag(tag):
        raise CheckpointNotFoundError(
            f"{tag} does not exist, and it is not a timm weight tag of {name} (e.g. "
            f"{pretrained_config(name).tag if name in _default_tags() else name + '.<tag>'}); pass an existing "
            f".safetensors/.pth file or a tag from resnext_jax.models.pretrained.list_pretrained({name + '.*'!r})")
    cfg = pretrained_config(tag)
    if cfg.architecture != name:
        raise InputError(f"{tag} holds {cfg.architecture}'s weights, not {name}'s: from_timm({cfg.architecture!r}, "
                         f"{tag!r})")
    url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    try:
        from huggingface_hub import hf_hub_download
        return read_timm_state(name, hf_hub_download(cfg.hf_hub_id, "model.safetensors"))
    except Exception as error:  # no huggingface_hub, no network, hub errors: all end the same way
        raise WeightsDownloadError(
            f"could not download timm weights {tag} ({type(error).__name__}: {_first_sentence(error)}); on "
            f"a machine with network, download {url} and pass its path: from_timm({name!r}, '/path/model.safetensors')"
        ) from error


def _first_sentence(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text.split(". ")[0][:120]


def _default_tags():
    from resnext_jax.models.timm_pretrained_cfgs import DEFAULT_TAGS
    return DEFAULT_TAGS


def from_timm(name: str, source: Any, *, num_classes: int | None = None, reinit_head: bool = False,
              rng: jax.Array | None = None, **model_overrides) -> dict:
    """Converts timm weights of model `name` into Flax variables `{'params', 'batch_stats'}`.

    Strict like `from_torchvision`: every missing, unexpected or mis-shaped key is named in one `ConversionError`,
    and torchvision RegNet weights are pointed to `from_torchvision`.

    Args:
      name: a timm name we register (`resnext_jax.list_models(source="timm")`), e.g. "regnety_032".
      source: see `read_timm_state`.
      num_classes, reinit_head, rng, **model_overrides: as in `from_torchvision` (`scan_blocks=True` gives the
        stacked layout).
    """
    family = _timm_family(name)
    state = read_timm_state(name, source)
    wrong = wrong_converter_hint(family, state, "from_timm")
    if wrong:
        raise ConversionError(f"cannot load this checkpoint into {name}: {wrong}")
    head = HEAD[family]
    head_shape = next((state[k].shape for k in (f"{head}.weight", f"{head}.bias") if k in state), ())
    ckpt_classes = int(head_shape[0]) if len(head_shape) else 0
    if num_classes is None and ckpt_classes:
        num_classes = ckpt_classes
    scanned = model_overrides.pop("scan_blocks", False)
    if num_classes is not None:
        model_overrides["num_classes"] = num_classes
    model = create_model(name, **model_overrides)
    num_classes = model.num_classes
    replace_head = num_classes != ckpt_classes and bool(state)
    if replace_head and num_classes > 0 and not reinit_head:
        have = f"a {ckpt_classes}-class head" if ckpt_classes else f"no head ({head}.weight)"
        raise ConversionError(f"the checkpoint has {have} but num_classes={num_classes}; pass reinit_head=True to "
                              f"start a new {num_classes}-class head" + ("" if ckpt_classes else ", or num_classes=0"))
    expected = _tv._expected_shapes(model)
    converted, found, unexpected, mismatched = {}, {}, [], []
    for key, value in state.items():
        if replace_head and isinstance(key, str) and key.startswith(head + "."):
            continue
        mapped = flax_key(family, key)
        if mapped is None:
            unexpected.append(str(key))
            continue
        target, kind, tensor_name = mapped
        if target is None:
            continue
        found[target] = _tv._flax_shape(kind, tensor_name, np.shape(value))  # all of them: the layout hint reads it
        if target not in expected:
            unexpected.append(key)
        elif found[target] != expected[target]:
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(value))}, {name} wants "
                              f"{_tv._torch_shape(kind, tensor_name, expected[target])}")
        else:
            converted[target] = _tv._to_flax(kind, tensor_name, np.asarray(value, dtype=np.float32))
    missing = [k for k in expected if k not in found and not (replace_head and k[1] == FLAX_HEAD)]
    if missing or unexpected or mismatched:
        others = [n for n in _layout_hint(family, found, "timm") if n != name]
        fix = (f"they look like {' or '.join(others)}'s: from_timm({others[0]!r}, ...)" if others else
               "there are no weights at all" if not state else
               f"check that they come from timm.create_model({name!r}) (with the same options)")
        raise _tv._mismatch_error(f"cannot load this checkpoint into {name}", name, family, found, "", fix=fix,
                                  unexpected=unexpected, mismatched=mismatched,
                                  missing=[_name_and_shape(family, k, expected[k]) for k in missing])
    variables = {k: jnp.asarray(v) for k, v in converted.items()}
    if replace_head and num_classes > 0:
        _tv.log.warning("%s: checkpoint head has %s classes; re-initialized a new %d-class head '%s'",
                        name, ckpt_classes or "no", num_classes, head)
        variables.update(_tv._fresh_head(model, FLAX_HEAD, rng if rng is not None else jax.random.key(0)))
    variables = traverse_util.unflatten_dict(variables)
    return _tv.stack_blocks(variables) if scanned else variables


def to_timm(name: str, variables: Mapping, **model_overrides) -> dict:
    """Converts Flax variables of timm name `name` to a timm state_dict (torch tensors) that
    `timm.create_model(name).load_state_dict(..., strict=True)` accepts.

    As strict as `from_timm`: the variables must be exactly those of `create_model(name, **model_overrides)` (the
    head size is read from them; pass `num_classes=0` for variables without a head), every problem named in one
    `ConversionError`. BatchNorm's `num_batches_tracked` is exported as 0; `scan_blocks` variables are unstacked.
    """
    import torch

    family = _timm_family(name)
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        keys = sorted(map(str, variables)) if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(f"to_timm({name!r}, variables) needs the variables dict {{'params': ..., "
                              f"'batch_stats': ...}} that model.init returns, not {keys}")
    flat = traverse_util.flatten_dict(_tv.unstack_blocks(variables))
    head_kernel = flat.get(("params", FLAX_HEAD, "kernel"))
    model_overrides.pop("scan_blocks", None)
    if np.ndim(head_kernel) == 2:
        model_overrides.setdefault("num_classes", int(np.shape(head_kernel)[-1]))
    expected = _tv._expected_shapes(create_model(name, **model_overrides))
    fitting, shapes, unexpected, mismatched = [], {}, [], []
    for key, value in flat.items():
        path = "/".join(map(str, key))
        mapped = timm_key(family, key)
        shape = tuple(np.shape(value)) if hasattr(value, "shape") else None
        shapes[key] = shape or ()
        if mapped is None:
            unexpected.append(f"{path} (no timm counterpart: a non-timm option such as se_ratio on a ResNet?)")
        elif shape is None:
            mismatched.append(f"{path} ({mapped[0]}): a {type(value).__name__}, not an array")
        elif key not in expected:
            unexpected.append(f"{path} (timm {mapped[0]} {_tv._torch_shape(mapped[1], mapped[2], shape)})")
        elif shape != expected[key]:
            mismatched.append(f"{path} ({mapped[0]}): variables {shape}, {name} wants {expected[key]}")
        else:
            fitting.append((*mapped, value))
    missing = [k for k in expected if k not in flat]
    if missing or unexpected or mismatched:
        fix = None if flat else "there are no variables at all"
        if fix is None and all(k[1] == FLAX_HEAD for k in missing) and not (unexpected or mismatched):
            fix = f"the variables have no head '{FLAX_HEAD}'; pass num_classes=0 to export a state_dict without it"
        others = [n for n in _layout_hint(family, shapes, "timm") if n != name]
        fix = fix or (f"they look like {' or '.join(others)}'s: to_timm({others[0]!r}, variables)" if others else
                      f"check that they come from create_model({name!r}) (with the same options)")
        raise _tv._mismatch_error(f"cannot export these variables as timm's {name}", name, family, shapes, "",
                                  fix=fix, missing=[_name_and_shape(family, k, expected[k]) for k in missing],
                                  unexpected=unexpected, mismatched=mismatched)
    state = {}
    for key, kind, tensor_name, value in fitting:
        array = np.asarray(value)
        array = array if array.dtype == np.float32 else array.astype(np.float32)
        state[key] = torch.from_numpy(np.array(_tv._to_torch(kind, tensor_name, array)))
        for buffer in TORCH_ONLY_BUFFERS.get(kind, ()):
            state[key.rpartition(".")[0] + "." + buffer] = torch.tensor(0, dtype=torch.long)
    return state
