"""XLA compile options for the model steps, per backend."""

from __future__ import annotations

import jax


def step_compiler_options(backend: str | None = None) -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a train step (for inference see
    `inference_compiler_options`).

    CPU: LLVM optimization level 1 instead of 2. The heavy math runs in XLA:CPU's library
    calls (matmuls, convolutions), which the level does not touch; level 1 only generates the
    elementwise fusions with fewer passes. Measured on the 2-core CPU (ResNeXt-50 train step,
    batch 8): compile 24.4-24.7 s -> 21.0 s at the same speed (4.33 vs 4.24-4.35 img/s);
    level 0 compiles in 19.6 s but runs 35% slower (docs/benchmarks.md).
    Other backends: none.
    """
    if (backend or jax.default_backend()) == "cpu":
        return {"xla_backend_optimization_level": 1}
    return {}


def inference_compiler_options(backend: str | None = None) -> dict:
    """Options for an eval or inference step (no gradients): `step_compiler_options`, and on CPU no YNN
    library fusions (`xla_cpu_experimental_ynn_fusion_type=''`), so that XLA:CPU runs the 1x1 convs'
    matmuls in its Eigen runtime instead.

    ResNeXt-50 inference, batch 8, 2-core CPU: 288.5 -> 269.5 ms per step (A/B, docs/benchmarks.md). Not
    for training: the same option makes the ResNeXt-50 train step 2.1x slower (1232 -> 2569 ms), its
    backward matmuls and reductions being faster in YNN.
    """
    options = step_compiler_options(backend)
    if (backend or jax.default_backend()) == "cpu":
        options["xla_cpu_experimental_ynn_fusion_type"] = ""
    return options
