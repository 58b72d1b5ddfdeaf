"""The two layouts of a network's variables: one module per block, or each stage's identical blocks stacked.

`scan_blocks=True` runs blocks 1..n-1 of a stage under `nn.scan`, whose variables carry a leading axis under
`layer{s}_rest` (ResNet) or `block{s}_rest` (RegNet). These functions convert exactly between the two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Top-level module names of per-block variables: ResNet's `layer{s}_{b}`, RegNet's `block{s}_{b}`.
_BLOCK_NAME = re.compile(r"^(layer|block)(\d+)_(\d+)$")
_STACKED_NAME = re.compile(r"^(layer|block)(\d+)_rest$")


def stack_blocks(variables: Mapping) -> dict:
    """Converts variables from the default layout to the `scan_blocks=True` one.

    In every collection, blocks 1..n-1 of a stage (`layer{s}_1`.. or `block{s}_1`..) are stacked
    leaf by leaf on a new leading axis under `layer{s}_rest` (`block{s}_rest`); block 0 and
    everything else stay as they are. Exact (no arithmetic); `unstack_blocks` inverts it.
    """
    out = {}
    for collection, tree in variables.items():
        tree, stages = dict(tree), {}
        for name in list(tree):
            match = _BLOCK_NAME.match(name)
            if match and int(match.group(3)) > 0:
                stages.setdefault((match.group(1), match.group(2)), {})[int(match.group(3))] = tree.pop(name)
        for (prefix, stage), blocks in stages.items():
            if sorted(blocks) != list(range(1, len(blocks) + 1)):
                raise ValueError(f"{collection}: {prefix}{stage} has blocks {sorted(blocks)}; stacking needs 1..n-1")
            tree[f"{prefix}{stage}_rest"] = jax.tree.map(
                lambda *leaves: jnp.stack(leaves), *[blocks[i] for i in sorted(blocks)]
            )
        out[collection] = tree
    return out


def unstack_blocks(variables: Mapping) -> dict:
    """Converts `scan_blocks=True` variables back to the default layout (inverse of `stack_blocks`).

    Variables already in the default layout pass through unchanged.
    """
    out = {}
    for collection, tree in variables.items():
        tree = dict(tree)
        for name in list(tree):
            match = _STACKED_NAME.match(name)
            if not match:
                continue
            stacked = tree.pop(name)
            count = jax.tree.leaves(stacked)[0].shape[0]
            for index in range(count):
                tree[f"{match.group(1)}{match.group(2)}_{index + 1}"] = jax.tree.map(lambda leaf: leaf[index], stacked)
        out[collection] = tree
    return out
