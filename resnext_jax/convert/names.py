"""The declarative torchvision <-> Flax name map.

Each rule pairs a torchvision module prefix with a Flax module path and says what
kind of layer sits there; the kind decides which tensors it holds and how each is
transformed (see `LAYER_KINDS`). `{s}`, `{b}` and `{i}` stand for integers and must
appear on both sides.
"""
from __future__ import annotations

import functools
import re

CONV, CONV_BIAS, BN, LINEAR = "conv", "conv_bias", "bn", "linear"

# kind -> [(torch tensor name, (flax collection, flax leaf name))]
LAYER_KINDS = {
    CONV: [("weight", ("params", "kernel"))],
    CONV_BIAS: [("weight", ("params", "kernel")), ("bias", ("params", "bias"))],
    BN: [("weight", ("params", "scale")), ("bias", ("params", "bias")),
         ("running_mean", ("batch_stats", "mean")), ("running_var", ("batch_stats", "var"))],
    LINEAR: [("weight", ("params", "kernel")), ("bias", ("params", "bias"))],
}
# torch buffers with no Flax counterpart: dropped on import, zero on export.
TORCH_ONLY_BUFFERS = {BN: ["num_batches_tracked"]}

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
    seen: set[str] = set()

    def field(match):
        name = match.group(1)
        if name in seen:
            return f"(?P={name})"
        seen.add(name)
        return f"(?P<{name}>\\d+)"

    escaped = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile("^" + re.sub(r"{(\w)}", field, escaped) + "$")


def _translate(family: str, path: str, source: int) -> tuple[str, str] | None:
    """Maps a module path on side `source` (0 = torch, 1 = flax) to (other side's path, kind)."""
    for rule in RULES[family]:
        match = _compile(rule[source]).match(path)
        if match:
            return rule[1 - source].format(**match.groupdict()), rule[2]
    return None


def torch_to_flax_module(family: str, torch_prefix: str):
    """`layer1.0.conv2` -> (`layer1_0/conv2`, kind) or None when no rule matches."""
    return _translate(family, torch_prefix, 0)


def flax_to_torch_module(family: str, flax_path: str):
    """`layer1_0/conv2` -> (`layer1.0.conv2`, kind) or None when no rule matches."""
    return _translate(family, flax_path, 1)
