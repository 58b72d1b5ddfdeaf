"""The full variable trees (keys and shapes) of four builders, pinned before the models were restructured.

`tests/data/param_trees.json` was written once from the models as they were before `conv`/`norm` injection
and the conv-norm unit (commit fd174b4), so any change of a parameter name, nesting or shape fails here, not
only in the parity tests of the families they cover. The torchvision parity tests check the same trees against
torchvision's state_dicts; this one also covers group norm and the scanned layout, which torchvision has not.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest

from resnext_jax import create_model

PINNED = os.path.join(os.path.dirname(__file__), "data", "param_trees.json")
# name -> create_model overrides
CASES = {
    "resnet18": {},
    "resnext50_32x4d": {},
    "regnet_y_400mf": {},
    "resnet50_group_scan": {"builder": "resnet50", "norm": "group", "scan_blocks": True},
}


def tree_of(case: dict) -> dict:
    kwargs = dict(case)
    name = kwargs.pop("name")
    model = create_model(kwargs.pop("builder", name), **kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


@pytest.mark.parametrize("name", sorted(CASES))
def test_variable_tree_is_pinned(name):
    with open(PINNED) as f:
        pinned = json.load(f)[name]
    case = {"name": name, **CASES[name]}
    assert tree_of(case) == pinned


if __name__ == "__main__":  # writes the pinned file (done once, before the restructuring)
    trees = {name: tree_of({"name": name, **case}) for name, case in CASES.items()}
    lines = ",\n".join(
        f"{json.dumps(name)}: {{\n"
        + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(tree.items()))
        + "}"
        for name, tree in sorted(trees.items())
    )
    with open(PINNED, "w") as f:
        f.write("{\n" + lines + "\n}\n")
