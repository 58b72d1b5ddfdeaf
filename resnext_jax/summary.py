"""Per-stage summary of a model: `python -m resnext_jax.summary resnext50_32x4d [--resolution 224]`.

Prints blocks, groups, bottleneck width, output channels, output size and params per
stage, then total params and multiply-add GFLOPs (convolutions and the classifier,
counted from the traced program, as torchvision's published GFLOPS count them).
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys

import jax
import jax.numpy as jnp
from flax import traverse_util

from resnext_jax.errors import InputError, run_cli
from resnext_jax.models.init import variable_shapes
from resnext_jax.models.registry import create_model, list_models


def count_macs(fn, *args) -> int:
    """Multiply-adds of every convolution and matmul in `fn(*args)` (args may be ShapeDtypeStructs)."""
    return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def forward_macs(model, variables, images) -> int:
    """Multiply-adds of the model's inference forward on `images` (a (B, H, W, 3) array or ShapeDtypeStruct).

    Counted with XLA's convolutions (`conv_impl='xla'`): the model's FLOPs, not an implementation's, since
    'auto' may pick block-diagonal chunks that multiply extra zeros.
    """
    nominal = model.clone(conv_impl="xla")
    return count_macs(lambda v, x: nominal.apply(v, x, train=False), variables, images)


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            kernel = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            per_output = math.prod(kernel[d] for d in rhs_spec[1:])
            total += math.prod(out) * per_output
        elif eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        # A scan body runs `length` times (scan_blocks=True models).
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn):
            total += repeats * _jaxpr_macs(sub)
    return total


def _subjaxprs(eqn):
    """Inner programs of control-flow and call primitives (pjit, custom_vjp, scan...)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def summarize(name: str, resolution: int = 224, **overrides) -> dict:
    """Returns the per-stage table and totals for model `name` at `resolution`x`resolution`.

    Raises `InputError` for a resolution below 1 (which would otherwise fail inside a JAX trace), an unknown
    model or an impossible field.
    """
    if not isinstance(resolution, numbers.Integral) or isinstance(resolution, bool) or resolution < 1:
        # Every stride-2 layer pads, so even 1x1 runs (each stage is then 1x1); the stride-32 stages need 32.
        raise InputError(
            f"resolution={resolution!r} is not allowed; use a positive number of pixels, e.g. 224 "
            f"(any size >= 1 runs, but below 32 the last stage of these stride-32 models is 1x1)"
        )
    model = create_model(name, **overrides)
    images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    variables = variable_shapes(model, resolution)
    features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, return_features=True), variables, images)
    params = traverse_util.flatten_dict(variables["params"])
    rows = []
    for index, spec in enumerate(model.stage_specs()):
        shape = features[f"stage{index + 1}"].shape
        stage_params = sum(math.prod(v.shape) for k, v in params.items() if k[0].startswith(spec["name"] + "_"))
        rows.append({**spec, "out_size": f"{shape[1]}x{shape[2]}", "params": stage_params})
    total_params = sum(math.prod(v.shape) for v in params.values())
    staged = sum(r["params"] for r in rows)
    head_params = sum(math.prod(v.shape) for k, v in params.items() if k[0] == "fc")
    macs = forward_macs(model, variables, images)
    return {
        "name": name,
        "resolution": resolution,
        "stages": rows,
        "stem_params": total_params - staged - head_params,
        "head_params": head_params,
        "params": total_params,
        "gflops": macs / 1e9,
    }


def format_summary(summary: dict) -> str:
    """Renders `summarize`'s result as a fixed-width table."""
    header = f"{'stage':<8}{'blocks':>7}{'groups':>8}{'width':>8}{'out ch':>8}{'out size':>10}{'params':>14}"
    lines = [f"{summary['name']} at {summary['resolution']}x{summary['resolution']}", header, "-" * len(header)]
    lines.append(f"{'stem':<8}{'':>7}{'':>8}{'':>8}{'':>8}{'':>10}{summary['stem_params']:>14,}")
    for row in summary["stages"]:
        lines.append(
            f"{row['name']:<8}{row['blocks']:>7}{row['groups']:>8}{row['bottleneck_width']:>8}"
            f"{row['out_channels']:>8}{row['out_size']:>10}{row['params']:>14,}"
        )
    lines.append(f"{'head':<8}{'':>7}{'':>8}{'':>8}{'':>8}{'':>10}{summary['head_params']:>14,}")
    lines.append("-" * len(header))
    lines.append(f"total params: {summary['params']:,}")
    lines.append(f"multiply-adds: {summary['gflops']:.3f} GFLOPs")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line; run through `run_cli`, so a bad model name or size prints one `error:` line (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.summary", description=__doc__.splitlines()[0])
    parser.add_argument("model", help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--resolution", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error too")
    args = parser.parse_args(argv)
    print(format_summary(summarize(args.model, args.resolution, num_classes=args.num_classes)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
