"""The conversion both libraries share: one import loop and one export loop, each parameterized by a `Library`
(whose `KeyMap` names the keys), so torchvision's and timm's converters are equally strict and say the same things.

Layouts: torch conv kernels are OIHW and Flax's HWIO (a grouped `(O, I/g, kh, kw)` is `(kh, kw, I/g, O)`, the
same contiguous channel-to-group order); linear weights are transposed; everything else is copied.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnext_jax.convert.names import FLAX_HEAD, STAGE_CONV3X3, TORCH_ONLY_BUFFERS, KeyMap
from resnext_jax.convert.sources import ConversionError
from resnext_jax.models.init import init_variables, variable_shapes
from resnext_jax.models.layout import stack_blocks, unstack_blocks
from resnext_jax.models.registry import create_model, list_models, model_info

log = logging.getLogger("resnext_jax.convert")


@dataclasses.dataclass(frozen=True)
class Library:
    """A torch library whose weights convert exactly: what the shared loops need to know of it.

    Attributes:
      name: "torchvision" or "timm": its `ModelInfo.sources` entry, its converters `from_{name}` / `to_{name}`,
        and whose keys the messages name.
      family: model name -> its family ("resnet", "regnet"); raises for a name the library does not publish.
      read: (model name, source) -> {torch key: numpy array}: a Module, a state_dict, a file or a weight tag.
      misplaced: (family, state) -> the fix when `state` holds the other library's weights, else None.
      key_map: (family, model) -> the `KeyMap` of that model (timm's depends on the model's fields).
      origin: where the weights of builder `{}` come from, the last-resort fix an error names.
      foreign: why a Flax variable may have no counterpart in this library, as an error line says it.
    """

    name: str
    family: Callable[[str], str]
    read: Callable[[str, Any], Mapping[str, np.ndarray]]
    misplaced: Callable[[str, Mapping], str | None]
    key_map: Callable[[str, nn.Module], KeyMap]
    origin: str
    foreign: str


def to_flax(kind: str, tensor_name: str, value: np.ndarray) -> np.ndarray:
    """A torch tensor (as numpy) in Flax's layout."""
    if tensor_name == "weight" and kind.startswith("conv"):
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO; grouped (O, I/g, kh, kw) -> (kh, kw, I/g, O)
    if tensor_name == "weight" and kind == "linear":
        return value.T
    return value


def to_torch(kind: str, tensor_name: str, value: np.ndarray) -> np.ndarray:
    """A Flax variable (as numpy) in torch's layout; the inverse of `to_flax`."""
    if tensor_name == "weight" and kind.startswith("conv"):
        return value.transpose(3, 2, 0, 1)
    if tensor_name == "weight" and kind == "linear":
        return value.T
    return value


def torch_shape(kind: str, tensor_name: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch-layout shape of a Flax-layout shape (a zero-stride view: nothing is allocated); a shape of the
    wrong rank comes back as it is, to be reported."""
    try:
        return to_torch(kind, tensor_name, np.broadcast_to(np.float32(0), flax_shape)).shape
    except ValueError:
        return tuple(flax_shape)


def flax_shape(kind: str, tensor_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Flax-layout shape of a torch-layout `shape`; the inverse of `torch_shape`."""
    try:
        return to_flax(kind, tensor_name, np.broadcast_to(np.float32(0), shape)).shape
    except ValueError:
        return tuple(shape)


def expected_shapes(model: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {Flax key: shape} of `model`'s variables (traced, nothing computed)."""
    return {k: v.shape for k, v in traverse_util.flatten_dict(variable_shapes(model, image_size=64)).items()}


@functools.cache
def _default_shapes(name: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    return expected_shapes(create_model(name))


def name_and_shape(key_map: KeyMap, flax_key: tuple[str, ...], shape: tuple[int, ...]) -> str:
    """`layer1.0.conv1.weight (64, 64, 1, 1)`: how a Flax variable is named and shaped in the library."""
    mapped = key_map.torch_key(flax_key)
    if mapped is None:
        return f"{'/'.join(flax_key)} {tuple(shape)}"
    return f"{mapped[0]} {torch_shape(mapped[1], mapped[2], shape)}"


def builders_with_layout(
    family: str, shapes: Mapping[tuple[str, ...], tuple[int, ...]], source: str = "torchvision"
) -> list[str]:
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
    layout = [
        (
            stage,
            len(blocks[stage]),
            tuple(shapes.get(("params", f"{stage}_0", conv, "kernel"), ())),
            widest.get(stage, 0),
        )
        for stage in stages
    ]
    matches = []
    for builder in list_models(source=source):
        if model_info(builder).family != family:
            continue
        expected = [
            (
                spec["name"],
                spec["blocks"],
                (3, 3, spec["bottleneck_width"] // spec["groups"], spec["bottleneck_width"]),
                spec["out_channels"],
            )
            for spec in create_model(builder).stage_specs()
        ]
        if layout == expected:
            matches.append(builder)
    return matches


def layout_hint(family: str, shapes: Mapping, source: str, fits: Callable[[str], bool] | None = None) -> list[str]:
    """`builders_with_layout`, narrowed where several share the stages (resnet26, resnet26d and resnet26t; RegNetX
    and Y) to those that `fits` (default: whose every variable has `shapes`' shape), if any."""
    names = builders_with_layout(family, shapes, source)
    if len(names) < 2:
        return names
    exact = [n for n in names if (fits(n) if fits else _default_shapes(n) == dict(shapes))]
    return exact or names


def state_shapes(key_map: KeyMap, state: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{Flax key: Flax-layout shape} of the keys of `state` that `key_map` knows."""
    return {m[0]: flax_shape(m[1], m[2], np.shape(v)) for k, v in state.items() if (m := key_map.flax_key(k)) and m[0]}


def _fix(
    library: Library, family: str, name: str, shapes: Mapping, call: str, fits: Callable[[str], bool] | None = None
) -> str:
    """The likely fix of a mismatch: weights of another builder (named), none at all, or a check of their origin."""
    if not shapes:
        return "there are no weights at all"
    names = layout_hint(family, shapes, library.name, fits)
    # `name` among them means no other builder fits exactly: its own weights with a key missing or extra, not
    # another builder's (resnet18 with one tensor missing is not resnet18d's, whose stages are the same).
    others = [] if name in names else names
    if others:
        return f"they look like {' or '.join(others)}'s: {call.format(others[0])}"
    return f"check that they come from {library.origin.format(name)}"


def mismatch_error(
    title: str, library: Library, fix: str, *, missing=(), unexpected=(), mismatched=(), foreign=()
) -> ConversionError:
    """One error naming every problem, with a first line that counts them and says the likely fix."""
    counts = [
        f"{len(items)} {label}"
        for items, label in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (mismatched, "wrong shape"),
            (foreign, f"without a {library.name} counterpart"),
        )
        if items
    ]
    lines = [f"{title}: {', '.join(counts)}; {fix}"]
    lines += [f"  missing key: {k}" for k in missing]
    lines += [f"  unexpected key: {k}" for k in unexpected]
    lines += [f"  wrong shape: {k}" for k in mismatched]
    lines += [f"  no {library.name} counterpart ({library.foreign}): {k}" for k in foreign]
    return ConversionError("\n".join(lines))


def fresh_head(model: nn.Module, head: str, rng: jax.Array) -> dict[tuple[str, ...], jax.Array]:
    """The head variables `model.init(rng, ...)` gives, without running the backbone.

    Returning only the head from a jitted init lets XLA drop every other op: about 1.5 s on a CPU instead of
    15-20 s for an eager or whole-model init of resnet18. The values are those of `model.init` up to the last
    bit (Flax derives each module's key from its path, not from the input; XLA may fuse the sampling differently).
    """

    def head_only(key):
        fresh = traverse_util.flatten_dict(init_variables(model, key, image_size=32))
        return {"/".join(k): v for k, v in fresh.items() if k[1] == head}

    return {tuple(k.split("/")): v for k, v in jax.jit(head_only)(rng).items()}


def import_state(
    library: Library,
    name: str,
    source: Any,
    *,
    num_classes: int | None,
    reinit_head: bool,
    rng: jax.Array | None,
    model_overrides: dict,
) -> dict:
    """The library's weights `source` as Flax variables of `create_model(name, **model_overrides)`; the arguments
    are `from_torchvision`'s. Every missing, unexpected or mis-shaped key is named in one `ConversionError`."""
    family = library.family(name)
    state = library.read(name, source)
    wrong = library.misplaced(family, state)
    if wrong:
        raise ConversionError(f"cannot load this checkpoint into {name}: {wrong}")
    overrides = dict(model_overrides)
    # Convert in the default (one module per block) layout, which the name map describes; stack at the end.
    scanned = overrides.pop("scan_blocks", False)
    key_map = library.key_map(family, create_model(name, **overrides))
    head = key_map.head
    head_shape = next((state[k].shape for k in (f"{head}.weight", f"{head}.bias") if k in state), ())
    ckpt_classes = int(head_shape[0]) if len(head_shape) else 0
    if num_classes is None and ckpt_classes:
        num_classes = ckpt_classes
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = create_model(name, **overrides)  # checks num_classes >= 0
    num_classes = model.num_classes
    # An empty state_dict is not "headless": it falls through to the list of every missing key.
    replace_head = num_classes != ckpt_classes and bool(state)
    if replace_head and num_classes > 0 and not reinit_head:
        if ckpt_classes:
            raise ConversionError(
                f"the checkpoint has a {ckpt_classes}-class head but num_classes={num_classes}; pass "
                f"reinit_head=True to load the backbone and start a new {num_classes}-class head"
            )
        raise ConversionError(
            f"the checkpoint has no head ({head}.weight) but num_classes={num_classes}; pass num_classes=0 for "
            f"features only, or reinit_head=True to start a new {num_classes}-class head"
        )
    expected = expected_shapes(model)

    converted, found, unexpected, mismatched = {}, {}, [], {}
    for torch_key, value in state.items():
        if replace_head and isinstance(torch_key, str) and torch_key.startswith(head + "."):
            continue
        mapped = key_map.flax_key(torch_key)
        if mapped is None:
            unexpected.append(str(torch_key))
            continue
        flax_key, kind, tensor_name = mapped
        if flax_key is None:
            continue
        found[flax_key] = flax_shape(kind, tensor_name, np.shape(value))  # all of them: the layout hint reads it
        if flax_key not in expected:
            unexpected.append(torch_key)
        elif found[flax_key] != expected[flax_key]:
            mismatched[flax_key] = (
                f"{torch_key}: checkpoint {tuple(np.shape(value))}, {name} wants "
                f"{torch_shape(kind, tensor_name, expected[flax_key])}"
            )
        else:
            converted[flax_key] = to_flax(kind, tensor_name, np.asarray(value, dtype=np.float32))
    missing = [k for k in expected if k not in found and not (replace_head and k[1] == FLAX_HEAD)]
    if missing or unexpected or mismatched:

        def fits(other: str) -> bool:  # read with the other builder's names (resnet26d's downsample.1 is a conv)
            return state_shapes(library.key_map(family, create_model(other)), state) == _default_shapes(other)

        raise mismatch_error(
            f"cannot load this checkpoint into {name}",
            library,
            _fix(library, family, name, found, f"from_{library.name}({{!r}}, ...)", fits),
            unexpected=unexpected,
            mismatched=list(mismatched.values()),
            missing=[name_and_shape(key_map, k, expected[k]) for k in missing],
        )
    variables = {k: jnp.asarray(v) for k, v in converted.items()}
    if replace_head and num_classes == 0 and ckpt_classes:
        log.info(
            "%s: dropped the checkpoint's %d-class head '%s' (num_classes=0: features only)", name, ckpt_classes, head
        )
    elif replace_head:
        log.warning(
            "%s: checkpoint head has %s classes; re-initialized a new %d-class head '%s'",
            name,
            ckpt_classes or "no",
            num_classes,
            head,
        )
        variables.update(fresh_head(model, FLAX_HEAD, rng if rng is not None else jax.random.key(0)))
    variables = traverse_util.unflatten_dict(variables)
    return stack_blocks(variables) if scanned else variables


def export_state(library: Library, name: str, variables: Mapping, model_overrides: dict) -> dict:
    """Flax `variables` of `create_model(name, **model_overrides)` as the library's state_dict (torch tensors); the
    arguments are `to_torchvision`'s. Every problem is named in one `ConversionError`."""
    import torch

    family = library.family(name)
    exporter = f"to_{library.name}"
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        keys = sorted(map(str, variables)) if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(
            f"{exporter}({name!r}, variables) needs the variables dict "
            f"{{'params': ..., 'batch_stats': ...}} that model.init returns, not {keys}"
        )
    if not all(isinstance(tree, Mapping) for tree in variables.values()):
        raise ConversionError(
            f"every collection of the variables must be a dict, not "
            f"{ {k: type(v).__name__ for k, v in variables.items()} }"
        )
    flat = traverse_util.flatten_dict(unstack_blocks(variables))
    overrides = dict(model_overrides)
    overrides.pop("scan_blocks", None)
    head_kernel = flat.get(("params", FLAX_HEAD, "kernel"))
    if np.ndim(head_kernel) == 2:
        overrides.setdefault("num_classes", int(np.shape(head_kernel)[-1]))
    model = create_model(name, **overrides)
    key_map = library.key_map(family, model)
    expected = expected_shapes(model)

    fitting, shapes, unexpected, mismatched, foreign = [], {}, [], [], []
    for flax_key, value in flat.items():
        path = "/".join(map(str, flax_key))
        mapped = key_map.torch_key(flax_key)
        if mapped is None:
            foreign.append(path)
            continue
        torch_key, kind, tensor_name = mapped
        shape = tuple(np.shape(value)) if hasattr(value, "shape") else None
        shapes[flax_key] = shape or ()
        if shape is None:
            mismatched.append(f"{path} ({torch_key}): a {type(value).__name__}, not an array")
        elif flax_key not in expected:
            unexpected.append(f"{path} ({library.name} {torch_key} {torch_shape(kind, tensor_name, shape)})")
        elif shape != expected[flax_key]:
            mismatched.append(
                f"{path} ({torch_key}): variables {shape}, {name} wants {expected[flax_key]} "
                f"({library.name} {torch_shape(kind, tensor_name, expected[flax_key])})"
            )
        else:
            fitting.append((torch_key, kind, tensor_name, value))
    missing = [k for k in expected if k not in flat]
    if missing or unexpected or mismatched or foreign:
        only_head = flat and all(k[1] == FLAX_HEAD for k in missing) and not (unexpected or mismatched or foreign)
        fix = (
            f"the variables have no head '{FLAX_HEAD}'; pass num_classes=0 to export a state_dict without it (a "
            f"{library.name} model whose {key_map.head} is nn.Identity() loads that)"
            if only_head
            else _fix(library, family, name, shapes, f"{exporter}({{!r}}, variables)")
        )
        raise mismatch_error(
            f"cannot export these variables as {library.name}'s {name}",
            library,
            fix,
            missing=[name_and_shape(key_map, k, expected[k]) for k in missing],
            unexpected=unexpected,
            mismatched=mismatched,
            foreign=foreign,
        )
    state = {}
    for torch_key, kind, tensor_name, value in fitting:
        array = np.asarray(value)
        if array.dtype != np.float32:  # the libraries' weights are float32; bf16 has no torch.from_numpy
            array = array.astype(np.float32)
        state[torch_key] = torch.from_numpy(np.array(to_torch(kind, tensor_name, array)))
        for buffer in TORCH_ONLY_BUFFERS.get(kind, ()):
            state[torch_key.rpartition(".")[0] + "." + buffer] = torch.tensor(0, dtype=torch.long)
    return state
