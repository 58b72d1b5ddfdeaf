"""Strict, exact torchvision <-> Flax weight conversion.

    variables = from_torchvision("resnext50_32x4d", "IMAGENET1K_V2")      # or a Module, state_dict, .pth path
    logits = create_model("resnext50_32x4d").apply(variables, images, train=False)
    state_dict = to_torchvision("resnext50_32x4d", variables)            # load_state_dict(strict=True) accepts it

The name map lives in `names.py`; torch is imported only when a function needs it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnext_jax.convert.names import (
    HEAD_PREFIX,
    LAYER_KINDS,
    STAGE_CONV3X3,
    TORCH_ONLY_BUFFERS,
    flax_to_torch_module,
    torch_to_flax_module,
)
from resnext_jax.convert.sources import (CheckpointNotFoundError, ConversionError, WeightsDownloadError,  # noqa: F401
                                         load_torch_state_dict)
from resnext_jax.convert.timm import from_timm, to_timm, wrong_converter_hint
from resnext_jax.models.layout import stack_blocks, unstack_blocks
from resnext_jax.models.registry import create_model, list_models, model_info

__all__ = [
    "CheckpointNotFoundError",
    "ConversionError",
    "from_timm",
    "from_torchvision",
    "load_torch_state_dict",
    "to_timm",
    "to_torchvision",
]

log = logging.getLogger(__name__)

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


def _torch_shape(kind: str, tensor_name: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch-layout shape of a Flax-layout shape (a zero-stride view: nothing is allocated); a shape of the
    wrong rank comes back as it is, to be reported."""
    try:
        return _to_torch(kind, tensor_name, np.broadcast_to(np.float32(0), flax_shape)).shape
    except ValueError:
        return tuple(flax_shape)


def _flax_shape(kind: str, tensor_name: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Flax-layout shape of a torch-layout shape; the inverse of `_torch_shape`."""
    try:
        return _to_flax(kind, tensor_name, np.broadcast_to(np.float32(0), torch_shape)).shape
    except ValueError:
        return tuple(torch_shape)


def _expected_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def _flax_key(family: str, torch_key: str):
    """torch key -> (flax key tuple, kind, tensor name); flax key is None for dropped buffers."""
    if not isinstance(torch_key, str):
        return None
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
    if len(flax_key) < 3:
        return None
    collection, *path, leaf_name = flax_key
    mapped = flax_to_torch_module(family, "/".join(path))
    if mapped is None:
        return None
    prefix, kind = mapped
    names = [t for t, leaf in LAYER_KINDS[kind] if leaf == (collection, leaf_name)]
    return (f"{prefix}.{names[0]}", kind, names[0]) if names else None


def _torch_name_and_shape(family: str, flax_key: tuple[str, ...], flax_shape: tuple[int, ...]) -> str:
    """`layer1.0.conv1.weight (64, 64, 1, 1)`: how a Flax variable is named and shaped in torchvision."""
    mapped = _torch_key(family, flax_key)
    if mapped is None:
        return f"{'/'.join(flax_key)} {tuple(flax_shape)}"
    torch_key, kind, tensor_name = mapped
    return f"{torch_key} {_torch_shape(kind, tensor_name, flax_shape)}"


def _builders_with_layout(family: str, shapes: Mapping[tuple[str, ...], tuple[int, ...]],
                          source: str = "torchvision") -> list[str]:
    """The builders of `family` whose stages match `shapes` (Flax keys -> Flax-layout shapes): the blocks per
    stage, the first block's 3x3 kernel shape and its widest output.

    Cheap (no tracing: `stage_specs` is plain arithmetic), so a conversion error can say which builder some
    weights belong to: resnet50 weights exported as resnet18 is the usual mistake.
    """
    conv = STAGE_CONV3X3[family]
    blocks: dict[str, set[int]] = {}
    widest: dict[str, int] = {}
    for key, shape in shapes.items():
        match = re.fullmatch(r"([a-z]+\d+)_(\d+)", key[1]) if len(key) > 2 else None
        if match:
            stage, block = match.group(1), int(match.group(2))
            blocks.setdefault(stage, set()).add(block)
            if block == 0 and key[-1] == "kernel" and len(shape):
                widest[stage] = max(widest.get(stage, 0), shape[-1])
    stages = sorted(blocks, key=lambda stage: int(re.sub(r"\D", "", stage)))
    layout = [(stage, len(blocks[stage]), tuple(shapes.get(("params", f"{stage}_0", conv, "kernel"), ())),
               widest.get(stage, 0)) for stage in stages]
    matches = []
    for builder in list_models(source=source):
        if model_info(builder).family != family:
            continue
        expected = [(spec["name"], spec["blocks"], (3, 3, spec["bottleneck_width"] // spec["groups"],
                                                    spec["bottleneck_width"]), spec["out_channels"])
                    for spec in create_model(builder).stage_specs()]
        if layout == expected:
            matches.append(builder)
    return matches


def _mismatch_error(title: str, name: str, family: str, shapes: Mapping, call: str, *, missing=(), unexpected=(),
                    mismatched=(), foreign=(), fix: str | None = None) -> ConversionError:
    """One error naming every problem, with a first line that counts them and says the likely fix."""
    counts = [f"{len(items)} {label}" for items, label in ((missing, "missing"), (unexpected, "unexpected"),
                                                           (mismatched, "wrong shape"),
                                                           (foreign, "without a torchvision counterpart")) if items]
    if fix is None and not shapes:
        fix = "there are no weights at all"
    if fix is None:
        others = [b for b in _builders_with_layout(family, shapes) if b != name]
        fix = (f"they look like {' or '.join(others)}'s: {call.format(others[0])}" if others else
               f"check that they come from torchvision's {name} (built with the same options)")
    lines = [f"{title}: {', '.join(counts)}; {fix}"]
    lines += [f"  missing key: {k}" for k in missing]
    lines += [f"  unexpected key: {k}" for k in unexpected]
    lines += [f"  wrong shape: {k}" for k in mismatched]
    lines += [f"  no torchvision counterpart (a non-torchvision option such as se_ratio or norm='group'?): {k}"
              for k in foreign]
    return ConversionError("\n".join(lines))


def _fresh_head(model, head: str, rng: jax.Array) -> dict[tuple[str, ...], jax.Array]:
    """The head variables `model.init(rng, ...)` gives, without running the backbone.

    Returning only the head from a jitted init lets XLA drop every other op: about 1.5 s on a CPU instead of
    15-20 s for an eager or whole-model init of resnet18. The values are those of `model.init` up to the last
    bit (Flax derives each module's key from its path, not from the input; XLA may fuse the sampling differently).
    """
    def head_only(key):
        fresh = traverse_util.flatten_dict(model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))
        return {"/".join(k): v for k, v in fresh.items() if k[1] == head}

    return {tuple(k.split("/")): v for k, v in jax.jit(head_only)(rng).items()}


def from_torchvision(name: str, source: Any, *, num_classes: int | None = None, reinit_head: bool = False,
                     rng: jax.Array | None = None, **model_overrides) -> dict:
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
    family = model_info(name).family
    state = load_torch_state_dict(name, source)
    wrong = wrong_converter_hint(family, state, "from_torchvision")
    if wrong:
        raise ConversionError(f"cannot load this checkpoint into {name}: {wrong}")
    head = HEAD_PREFIX[family]
    head_shape = next((state[k].shape for k in (f"{head}.weight", f"{head}.bias") if k in state), ())
    ckpt_classes = int(head_shape[0]) if len(head_shape) else 0
    if num_classes is None and ckpt_classes:
        num_classes = ckpt_classes
    # Convert in the default (one module per block) layout, which the name map describes; stack at the end.
    scanned = model_overrides.pop("scan_blocks", False)
    if num_classes is not None:
        model_overrides["num_classes"] = num_classes
    model = create_model(name, **model_overrides)  # checks num_classes >= 0
    num_classes = model.num_classes
    # An empty state_dict is not "headless": it falls through to the list of every missing key.
    replace_head = num_classes != ckpt_classes and bool(state)
    if replace_head and num_classes > 0 and not reinit_head:
        if ckpt_classes:
            raise ConversionError(
                f"the checkpoint has a {ckpt_classes}-class head but num_classes={num_classes}; pass "
                f"reinit_head=True to load the backbone and start a new {num_classes}-class head")
        raise ConversionError(
            f"the checkpoint has no head ({head}.weight) but num_classes={num_classes}; pass num_classes=0 for "
            f"features only, or reinit_head=True to start a new {num_classes}-class head")
    expected = _expected_shapes(model)

    converted, found, unexpected, mismatched = {}, {}, [], {}
    for torch_key, value in state.items():
        if replace_head and isinstance(torch_key, str) and torch_key.startswith(head + "."):
            continue
        mapped = _flax_key(family, torch_key)
        if mapped is None:
            unexpected.append(str(torch_key))
            continue
        flax_key, kind, tensor_name = mapped
        if flax_key is None:
            continue
        found[flax_key] = _flax_shape(kind, tensor_name, np.shape(value))
        if flax_key not in expected:
            unexpected.append(torch_key)
        elif found[flax_key] != expected[flax_key]:
            mismatched[flax_key] = (f"{torch_key}: checkpoint {tuple(np.shape(value))}, {name} wants "
                                    f"{_torch_shape(kind, tensor_name, expected[flax_key])}")
        else:
            converted[flax_key] = _to_flax(kind, tensor_name, np.asarray(value, dtype=np.float32))
    missing = [k for k in expected if k not in found and not (replace_head and k[1] == head)]
    if missing or unexpected or mismatched:
        raise _mismatch_error(f"cannot load this checkpoint into {name}", name, family, found,
                              "from_torchvision({!r}, ...)", unexpected=unexpected,
                              mismatched=list(mismatched.values()),
                              missing=[_torch_name_and_shape(family, k, expected[k]) for k in missing])
    variables = {k: jnp.asarray(v) for k, v in converted.items()}
    if replace_head and num_classes == 0 and ckpt_classes:
        log.info("%s: dropped the checkpoint's %d-class head '%s' (num_classes=0: features only)",
                 name, ckpt_classes, head)
    elif replace_head:
        log.warning("%s: checkpoint head has %s classes; re-initialized a new %d-class head '%s'",
                    name, ckpt_classes or "no", num_classes, head)
        variables.update(_fresh_head(model, head, rng if rng is not None else jax.random.key(0)))
    variables = traverse_util.unflatten_dict(variables)
    return stack_blocks(variables) if scanned else variables


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
    import torch

    family = model_info(name).family
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        keys = sorted(map(str, variables)) if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(f"to_torchvision({name!r}, variables) needs the variables dict "
                              f"{{'params': ..., 'batch_stats': ...}} that model.init returns, not {keys}")
    if not all(isinstance(tree, Mapping) for tree in variables.values()):
        raise ConversionError(f"every collection of the variables must be a dict, not "
                              f"{ {k: type(v).__name__ for k, v in variables.items()} }")
    flat = traverse_util.flatten_dict(unstack_blocks(variables))
    head = HEAD_PREFIX[family]
    head_kernel = flat.get(("params", head, "kernel"))
    model_overrides.pop("scan_blocks", None)
    if np.ndim(head_kernel) == 2:
        model_overrides.setdefault("num_classes", int(np.shape(head_kernel)[-1]))
    expected = _expected_shapes(create_model(name, **model_overrides))

    fitting, shapes, unexpected, mismatched, foreign = [], {}, [], [], []
    for flax_key, value in flat.items():
        path = "/".join(map(str, flax_key))
        mapped = _torch_key(family, flax_key)
        if mapped is None:
            foreign.append(path)
            continue
        torch_key, kind, tensor_name = mapped
        shape = tuple(np.shape(value)) if hasattr(value, "shape") else None
        shapes[flax_key] = shape or ()
        if shape is None:
            mismatched.append(f"{path} ({torch_key}): a {type(value).__name__}, not an array")
        elif flax_key not in expected:
            unexpected.append(f"{path} (torchvision {torch_key} {_torch_shape(kind, tensor_name, shape)})")
        elif shape != expected[flax_key]:
            mismatched.append(f"{path} ({torch_key}): variables {shape}, {name} wants {expected[flax_key]} "
                              f"(torchvision {_torch_shape(kind, tensor_name, expected[flax_key])})")
        else:
            fitting.append((torch_key, kind, tensor_name, value))
    missing_keys = [k for k in expected if k not in flat]
    if missing_keys or unexpected or mismatched or foreign:
        only_head = flat and all(k[1] == head for k in missing_keys) and not (unexpected or mismatched or foreign)
        raise _mismatch_error(
            f"cannot export these variables as torchvision's {name}", name, family, shapes,
            "to_torchvision({!r}, variables)", missing=[_torch_name_and_shape(family, k, expected[k])
                                                         for k in missing_keys],
            unexpected=unexpected, mismatched=mismatched, foreign=foreign,
            fix=f"the variables have no head '{head}'; pass num_classes=0 to export a state_dict without it (a "
                f"torchvision model whose {head} is nn.Identity() loads that)" if only_head else None)
    state = {}
    for torch_key, kind, tensor_name, value in fitting:
        array = np.asarray(value)
        if array.dtype != np.float32:  # torchvision's weights are float32; bf16 has no torch.from_numpy
            array = array.astype(np.float32)
        state[torch_key] = torch.from_numpy(np.array(_to_torch(kind, tensor_name, array)))
        for buffer in TORCH_ONLY_BUFFERS.get(kind, ()):
            state[torch_key.rpartition(".")[0] + "." + buffer] = torch.tensor(0, dtype=torch.long)
    return state
