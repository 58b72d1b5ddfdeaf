"""The step benchmark's `--devices N` check: does data parallelism split the step's FLOPs over N devices?

XLA does not partition grouped convolutions (openxla/xla#47945), so a plain-`jit` step on a batch-sharded input
can leave every device recomputing the whole batch; the training system's `shard_map` step gives each device its
own slice. The check compiles both over N host devices and compares each one's per-device FLOPs with the
single-device step's. It needs N devices before JAX starts, so it runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def check_batch_divides(batch: int, devices: int) -> None:
    """Raises a ValueError naming the fix when the global batch does not split evenly over devices."""
    if batch % devices:
        raise ValueError(f"--batch {batch} is not divisible by --devices {devices}; use a multiple of {devices}")


def flops_check(args) -> dict:
    """Per-device FLOPs of the shard_map and plain-jit data-parallel steps vs the single-device step.

    Runs in a process whose XLA_FLAGS give it `args.devices` host devices. Counts come from
    `compiled.cost_analysis()['flops']`, which XLA reports per device for a partitioned program.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from resnext_jax.benchmarks.jax_step import train_step
    from resnext_jax.models.init import variable_shapes
    from resnext_jax.models.registry import create_model

    num = jax.device_count()
    check_batch_divides(args.batch, num)
    # Auto axes: the plain-jit contrast is GSPMD propagation from a batch-sharded input, not explicit sharding types.
    mesh = jax.make_mesh((num,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    res, classes = args.flops_resolution, 1000
    fields = dict(conv_impl=args.flops_conv_impl, scan_blocks=args.scan_blocks)
    local = create_model(args.model, **fields)
    synced = create_model(args.model, bn_axis_name="data", **fields)
    images = jnp.zeros((args.batch, res, res, 3))
    labels = jnp.zeros((args.batch,), jnp.int32)
    variables = variable_shapes(local, res)
    tx = optax.adamw(1e-3)

    def step_for(model, axis_name=None, update=True):
        if args.mode == "infer":
            return lambda v, x, y: model.apply(v, x, train=False)
        return train_step(model, tx, classes, axis_name, update)

    state = (
        variables
        if args.mode == "infer"
        else (variables["params"], variables["batch_stats"], jax.eval_shape(tx.init, variables["params"]))
    )

    def flops(fn, sharded_batch: bool = False):
        def spec(tree, sharding):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

        args = (state, images, labels)
        if sharded_batch:
            args = (spec(state, NamedSharding(mesh, P())), *spec((images, labels), NamedSharding(mesh, P("data"))))
        return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])

    def shard_mapped(update=True):
        out_specs = P("data") if args.mode == "infer" else (P(), P())
        return jax.shard_map(
            step_for(synced, "data", update),
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=out_specs,
            check_vma=False,
        )

    single = flops(step_for(local))
    per_device_shard_map = flops(shard_mapped(), sharded_batch=True)
    per_device_jit = flops(step_for(local), sharded_batch=True)
    result = {
        "devices": num,
        "conv_impl": args.flops_conv_impl,
        "resolution": res,
        "mode": args.mode,
        "single_device_flops": single,
        "shard_map_per_device_flops": per_device_shard_map,
        "shard_map_ratio": per_device_shard_map * num / single,
        "jit_per_device_flops": per_device_jit,
        "jit_ratio": per_device_jit * num / single,
    }
    if args.mode == "train":
        # Without the optimizer update, which every data-parallel replica runs in full on its copy of the params.
        grads_single = flops(step_for(local, update=False))
        result["shard_map_gradient_ratio"] = flops(shard_mapped(update=False), sharded_batch=True) * num / grads_single
        result["jit_gradient_ratio"] = flops(step_for(local, update=False), sharded_batch=True) * num / grads_single
    return result


def run_flops_check_subprocess(args, argv) -> dict:
    """Runs `flops_check` in a child process with N host devices (XLA_FLAGS must be set before jax loads): the
    step benchmark's own command line plus the hidden `--_flops-check`. Returns its result or {'error': line}."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "resnext_jax.benchmarks.step", *argv, "--_flops-check"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.strip().splitlines() if "Error" in line or "error" in line]
        return {"error": (errors or result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])
