"""Per-shape timing of `cpu.matmul_affine` against XLA's matmul + batch-norm pass, at the 1x1 convs' shapes.

    python benchmarks/matmul.py [--model resnext50_32x4d|resnet50] [--runs 15]

Each row: M x K -> N (batch 8 at 224², one row per distinct 1x1 conv shape), the median ms of the jitted
`relu(a @ b * s + h)` and `relu(a @ b * s + h + r)` under `ops.inference_compiler_options()` (XLA), and of
`cpu.matmul_affine` for the same (docs/benchmarks-history.md). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

SHAPES = {
    "resnext50_32x4d": [
        (25088, 64, 128),
        (25088, 256, 128),
        (25088, 128, 256),
        (25088, 64, 256),
        (25088, 256, 256),
        (6272, 512, 256),
        (6272, 256, 512),
        (6272, 512, 512),
        (1568, 1024, 512),
        (1568, 512, 1024),
        (1568, 1024, 1024),
        (392, 2048, 1024),
        (392, 1024, 2048),
    ],
    "resnet50": [
        (25088, 64, 64),
        (25088, 256, 64),
        (25088, 64, 256),
        (25088, 256, 128),
        (6272, 512, 128),
        (6272, 128, 512),
        (6272, 512, 256),
        (1568, 1024, 256),
        (1568, 256, 1024),
        (1568, 1024, 512),
        (392, 2048, 512),
        (392, 512, 2048),
    ],
}


def median_seconds(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/matmul.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="resnext50_32x4d")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnext_jax import cpu
    from resnext_jax.ops import inference_compiler_options

    if not cpu.available():
        raise SystemExit(f"the native kernels are unavailable here: {cpu.unavailable_reason()}")
    options = inference_compiler_options()
    rng = np.random.default_rng(0)
    print(
        f"{'M x K -> N':>20} {'XLA+BN':>8} {'native':>8} {'XLA+BN+res':>11} {'native':>8}  (ms, medians of {args.runs})"
    )
    for m, k, n in SHAPES[args.model]:
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        r = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
        s, h = jnp.ones(n), jnp.zeros(n)
        steps = [
            (lambda a, b, s, h, r: jnp.maximum(a @ b * s + h, 0)),
            (lambda a, b, s, h, r: cpu.matmul_affine(a, b, s, h, relu=True)),
            (lambda a, b, s, h, r: jnp.maximum(a @ b * s + h + r, 0)),
            (lambda a, b, s, h, r: cpu.matmul_affine(a, b, s, h, r, relu=True)),
        ]
        times = []
        for step in steps:
            compiled = jax.jit(step, compiler_options=options).lower(a, b, s, h, r).compile()
            times.append(median_seconds(lambda: compiled(a, b, s, h, r).block_until_ready(), args.runs) * 1e3)
        print(f"{f'{m} x {k} -> {n}':>20} {times[0]:8.2f} {times[1]:8.2f} {times[2]:11.2f} {times[3]:8.2f}")


if __name__ == "__main__":
    main()
