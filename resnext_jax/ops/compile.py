"""XLA compile options for the model steps, per backend."""

from __future__ import annotations

import jax


def step_compiler_options(backend: str | None = None) -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a train step (for inference see
    `inference_compiler_options`).

    CPU: LLVM optimization level 1 instead of 2. The heavy math runs in XLA:CPU's library
    calls (matmuls, convolutions), which the level does not touch; level 1 only generates the
    elementwise fusions with fewer passes, so it compiles faster at the same step speed (level 0 compiles
    faster still but runs slower; docs/benchmarks-history.md). Other backends: none.
    """
    if (backend or jax.default_backend()) == "cpu":
        return {"xla_backend_optimization_level": 1}
    return {}


def inference_compiler_options(backend: str | None = None) -> dict:
    """Options for an eval or inference step (no gradients): `step_compiler_options`, and on CPU no YNN
    library fusions (`xla_cpu_experimental_ynn_fusion_type=''`), so that XLA:CPU runs the 1x1 convs'
    matmuls in its Eigen runtime instead.

    Faster at inference; not for training, whose backward matmuls and reductions are faster in YNN (both
    measured in docs/benchmarks-history.md).
    """
    options = step_compiler_options(backend)
    if (backend or jax.default_backend()) == "cpu":
        options["xla_cpu_experimental_ynn_fusion_type"] = ""
    return options
