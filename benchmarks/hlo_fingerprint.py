"""Whether two revisions compute the same thing: hashes of the lowered StableHLO of train and infer steps.

    python benchmarks/hlo_fingerprint.py REV_A REV_B

Each REV is a git revision or `.` (the working tree), imported side by side as `benchmarks/ab.py` does. For each
case (a model and its options) the script lowers a loss-and-gradients step (`train`) and a forward (`infer`) at
batch 8, 224x224 on this machine's backend and hashes the StableHLO text, with the native kernels' build suffix
(`_<16 hex>`, which changes whenever their sources do) removed. Identical hashes mean XLA receives the same
program, so behaviour and speed cannot differ: a refactoring check that costs seconds where an A/B timing costs
minutes and only resolves a few percent.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ("resnext50_32x4d", {}),
    ("resnet50", {}),
    ("regnet_y_1_6gf", {}),
    ("resnet18", {}),
    ("regnet_x_400mf", {"scan_blocks": True}),
    ("resnet50", {"norm": "group"}),
    ("resnext50_32x4d", {"dtype": "bfloat16"}),
    ("regnet_y_400mf", {"drop_path_rate": 0.1, "se_ratio": 0.0}),
    ("resnet50", {"se_ratio": 0.25, "drop_path_rate": 0.1}),
    ("resnet50", {"conv_impl": "xla"}),
]
_BUILD_SUFFIX = re.compile(r"(resnext_jax_[a-z_]+?)_[0-9a-f]{16}")


def fingerprints(registry) -> dict[str, str]:
    import jax
    import jax.numpy as jnp
    import optax

    out = {}
    for name, options in CASES:
        kwargs = {k: getattr(jnp, v) if k == "dtype" else v for k, v in options.items()}
        model = registry.create_model(name, **kwargs)
        x, y = jnp.zeros((8, 224, 224, 3)), jnp.zeros((8,), jnp.int32)
        v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))
        rest = {k: val for k, val in v.items() if k != "params"}

        def loss(p, s, x, y):
            logits, updates = model.apply(
                {"params": p, **s}, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        lowered = {
            "train": jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(v["params"], rest, x, y),
            "infer": jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(v, x),
        }
        for mode, low in lowered.items():
            text = _BUILD_SUFFIX.sub(r"\1", low.as_text())
            out[f"{name} {options or ''} {mode}".replace("  ", " ")] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/hlo_fingerprint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs=2, metavar="REV", help="git revisions, or '.' for the working tree")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ab  # export() and import_package(): two revisions in one process

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, rev in enumerate(args.revs):
            results[index] = fingerprints(ab.import_package(ab.export(rev, os.path.join(tmp, str(index)))))
    same = 0
    for case, a in results[0].items():
        b = results[1].get(case)
        same += a == b
        print(f"{'identical' if a == b else 'DIFFERS  '} {a} {b} {case}")
    print(f"{same} of {len(results[0])} computations identical between {args.revs[0]} and {args.revs[1]}")
    return 0 if same == len(results[0]) else 1


if __name__ == "__main__":
    sys.exit(main())
