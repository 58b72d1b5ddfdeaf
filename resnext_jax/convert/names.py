"""The declarative torch <-> Flax name maps: torchvision's here, timm's in `timm.py`, read by one `KeyMap`.

Each rule pairs a torch module prefix with a Flax module path and says what kind of layer sits there; the kind
decides which tensors it holds and how each is transformed (see `LAYER_KINDS`). `{s}`, `{b}` and `{i}` stand for
integers and must appear on both sides; `{b1}` on the torch side is the Flax `{b}` plus one.
"""

from __future__ import annotations

import dataclasses
import functools
import re

CONV, CONV_BIAS, BN, GN, LINEAR = "conv", "conv_bias", "bn", "gn", "linear"

# kind -> [(torch tensor name, (flax collection, flax leaf name))]
LAYER_KINDS = {
    CONV: [("weight", ("params", "kernel"))],
    CONV_BIAS: [("weight", ("params", "kernel")), ("bias", ("params", "bias"))],
    BN: [
        ("weight", ("params", "scale")),
        ("bias", ("params", "bias")),
        ("running_mean", ("batch_stats", "mean")),
        ("running_var", ("batch_stats", "var")),
    ],
    GN: [("weight", ("params", "scale")), ("bias", ("params", "bias"))],
    LINEAR: [("weight", ("params", "kernel")), ("bias", ("params", "bias"))],
}
# torch buffers with no Flax counterpart: dropped on import, zero on export.
TORCH_ONLY_BUFFERS = {BN: ["num_batches_tracked"]}
# The Flax name of every model's classifier (`Network.head`).
FLAX_HEAD = "fc"

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
        ("stem.0", "stem_conv", CONV),
        ("stem.1", "stem_bn", BN),
        ("trunk_output.block{s}.block{s}-{b}.f.a.0", "block{s}_{b}/a_conv", CONV),
        ("trunk_output.block{s}.block{s}-{b}.f.a.1", "block{s}_{b}/a_bn", BN),
        ("trunk_output.block{s}.block{s}-{b}.f.b.0", "block{s}_{b}/b_conv", CONV),
        ("trunk_output.block{s}.block{s}-{b}.f.b.1", "block{s}_{b}/b_bn", BN),
        ("trunk_output.block{s}.block{s}-{b}.f.se.fc{i}", "block{s}_{b}/se/fc{i}", CONV_BIAS),
        ("trunk_output.block{s}.block{s}-{b}.f.c.0", "block{s}_{b}/c_conv", CONV),
        ("trunk_output.block{s}.block{s}-{b}.f.c.1", "block{s}_{b}/c_bn", BN),
        ("trunk_output.block{s}.block{s}-{b}.proj.0", "block{s}_{b}/proj_conv", CONV),
        ("trunk_output.block{s}.block{s}-{b}.proj.1", "block{s}_{b}/proj_bn", BN),
        ("fc", "fc", LINEAR),
    ],
}
HEAD_PREFIX = {"resnet": "fc", "regnet": "fc"}
# The 3x3 (grouped) conv of each block, as a Flax module name: its kernel shape and the blocks per stage tell the
# builders of a family apart, so a conversion error can name the builder some weights came from.
STAGE_CONV3X3 = {"resnet": "conv2", "regnet": "b_conv"}


@functools.cache  # every key of a checkpoint is matched against every rule
def _compile(template: str) -> re.Pattern:
    """`block{s}.block{s}-{b}` -> a regex with one named group per field (a repeated field must repeat its value);
    numbers without leading zeros, so that every key has one spelling and a round trip gives it back."""
    seen: set[str] = set()

    def field(match):
        name = match.group(1)
        if name in seen:
            return f"(?P={name})"
        seen.add(name)
        return f"(?P<{name}>0|[1-9]\\d*)"

    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile("^" + re.sub(r"{(\w+)}", field, escaped) + "$")


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """One library's names for one model's variables; both converters of both libraries read them through it.

    Attributes:
      library: "torchvision" or "timm" (`ModelInfo.sources`; messages say whose keys they name).
      rules: (torch module prefix, Flax module path, kind) triples; the first whose side matches wins.
      head: the torch prefix of the classifier (timm's `PretrainedCfg.classifier`); the Flax one is `FLAX_HEAD`.
    """

    library: str
    rules: tuple[tuple[str, str, str], ...]
    head: str

    def translate(self, path: str, side: int) -> tuple[str, str] | None:
        """A module path on side `side` (0 = torch, 1 = Flax) -> (the other side's path, kind), or None."""
        for rule in self.rules:
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

    def flax_key(self, torch_key) -> tuple[tuple[str, ...] | None, str, str] | None:
        """torch key -> (Flax key tuple, or None for a dropped buffer; kind; tensor name), or None if unknown."""
        if not isinstance(torch_key, str):
            return None
        prefix, _, tensor_name = torch_key.rpartition(".")
        mapped = self.translate(prefix, 0)
        if mapped is None:
            return None
        path, kind = mapped
        if tensor_name in TORCH_ONLY_BUFFERS.get(kind, ()):
            return None, kind, tensor_name
        leaf = dict(LAYER_KINDS[kind]).get(tensor_name)
        if leaf is None:
            return None
        return (leaf[0], *path.split("/"), leaf[1]), kind, tensor_name

    def torch_key(self, flax_key: tuple[str, ...]) -> tuple[str, str, str] | None:
        """Flax key tuple -> (torch key, kind, tensor name), or None if it has no counterpart."""
        if len(flax_key) < 3:
            return None
        collection, *path, leaf_name = flax_key
        mapped = self.translate("/".join(map(str, path)), 1)
        if mapped is None:
            return None
        prefix, kind = mapped
        names = [t for t, leaf in LAYER_KINDS[kind] if leaf == (collection, leaf_name)]
        return (f"{prefix}.{names[0]}", kind, names[0]) if names else None


@functools.cache
def torchvision_key_map(family: str) -> KeyMap:
    """torchvision's names for every model of `family` (its builders have no variants that rename a layer)."""
    return KeyMap("torchvision", tuple(RULES[family]), HEAD_PREFIX[family])
