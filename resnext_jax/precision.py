"""bfloat16 on a CPU is a choice the user sees: one line with the measured cost and the faster alternative.

XLA:CPU has no fast bfloat16 convolutions (unlike torch's oneDNN with AMX), so on a CPU backend bfloat16 is slower
than float32, not faster. Measured on a 2-core Xeon with AVX-512, VNNI and AMX, 2026-12-07 (issue 30): ResNeXt-50
inference at batch 8, 15.8 img/s in bfloat16 against 22.2 in float32; a fine-tune epoch of configs/finetune_folder.py
180 s in bfloat16 against 39 s in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_COST = (
    "on this CPU backend bfloat16 is slower than float32 (ResNeXt-50, measured: 0.7x float32's img/s at inference, "
    "4.6x its time per training epoch)"
)


def bf16_cpu_note(dtype, what: str) -> str | None:
    """The line to print when `what` ('training', 'predict', 'evaluate') computes in bfloat16 on a CPU backend;
    None otherwise (float32, or a GPU/TPU, where bfloat16 is the fast choice)."""
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.bfloat16:
        return None
    if what == "training":
        fix = "train in float32 with --config.half_precision=False"
    else:
        fix = (
            "to serve on a CPU, export int8 ONNX (python -m resnext_jax.export RUN --format onnx --quantize int8 "
            "--calibrate DATASET) and run that file"
        )
    return f"note: {what} in bfloat16: {_COST}; {fix}"
