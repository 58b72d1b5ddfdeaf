"""Cost of the train step's per-stage diagnostics: the step with and without per-stage norms, timed in turns in
one process, and the dead-ReLU forward that runs once per log step.

    python benchmarks/stage_diagnostics.py [--model resnext50_32x4d] [--batch 8] [--resolution 224] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax

import resnext_jax
from resnext_jax.benchmarks.timing import time_in_blocks
from resnext_jax.models.init import init_variables
from resnext_jax.parallel import create_mesh
from resnext_jax.training.step import AXIS, create_train_state, make_dead_relu_step, make_train_step


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-every-steps", type=int, default=50)
    args = parser.parse_args(argv)
    model = resnext_jax.create_model(args.model, num_classes=1000, bn_axis_name=AXIS)
    mesh = create_mesh()
    schedule = optax.constant_schedule(1e-3)
    tx = optax.adamw(schedule)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(args.batch, args.resolution, args.resolution, 3)).astype(np.float32),
        "label": rng.integers(0, 1000, args.batch).astype(np.int32),
    }
    variables = init_variables(model, jax.random.key(0), args.resolution)
    steps, states, compile_s = {}, {}, {}
    for name, flag in (("without", False), ("with", True)):
        step = make_train_step(model, tx, schedule, mesh, num_classes=1000, stage_diagnostics=flag)
        states[name] = create_train_state(tx, jax.tree.map(np.array, variables), jax.random.key(1), False)
        start = time.perf_counter()
        states[name], metrics = step(states[name], batch)
        jax.block_until_ready(metrics)
        compile_s[name] = time.perf_counter() - start

        def run(name=name, step=step):
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics)

        steps[name] = run
    dead_relu = make_dead_relu_step(model, mesh)
    # A copy: the timed train steps donate (delete) the state buffers.
    current = jax.tree.map(np.array, {"params": states["with"].params, "batch_stats": states["with"].batch_stats})
    start = time.perf_counter()
    jax.block_until_ready(dead_relu(current, batch))
    compile_s["dead_relu"] = time.perf_counter() - start
    steps["dead_relu"] = lambda: jax.block_until_ready(dead_relu(current, batch))
    result = time_in_blocks(steps, runs=args.runs, warmup=1, rounds=args.rounds)
    medians = {key: value["median_s"] for key, value in result.items()}
    norms_cost = medians["with"] / medians["without"] - 1
    dead_cost = medians["dead_relu"] / args.log_every_steps / medians["with"]
    print(
        json.dumps(
            {
                "args": vars(args),
                "median_s": medians,
                "compile_s": compile_s,
                "per_stage_norms_cost": round(norms_cost, 4),
                "dead_relu_cost_per_step_at_log_every": round(dead_cost, 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
