"""python -m resnext_jax.benchmarks.serve on a tiny batch: every path runs the same weights (its logits match JAX
float32's: float32 paths to float32 rounding, int8 and bfloat16 loosely) and the table names the CPU's ISA flags.
No timings are asserted (the benchmark is run by hand on a quiet machine; docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from resnext_jax.benchmarks import serve


@pytest.mark.slow  # compiles resnet18 twice (float32, bfloat16), about 25 s on 2 cores
def test_every_serving_path_runs_the_same_model(tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["--model", "resnet18", "--resolution", "32", "--batch", "2", "--runs", "1", "--rounds", "1"]
    argv += ["--warmup", "0", "--calibration-batches", "2", "--json", str(out)]
    assert serve.main(argv + ["--paths", *serve.PATHS[:-1]]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("python -m resnext_jax.benchmarks.serve --model resnet18")
    results = json.loads(out.read_text())
    rows = {row["path"]: row for row in results["rows"]}
    assert sorted(rows) == sorted(serve.PATHS[:-1])
    for path in ("ort_f32", "torch_f32"):
        assert rows[path]["max_abs_vs_jax_f32"] < 1e-4, path
    for path in ("jax_bf16", "torch_bf16", "ort_int8"):  # other arithmetic, same model: close, not equal
        assert 0 < rows[path]["max_abs_vs_jax_f32"] < 1.0, path
    assert all(row["images_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] for row in rows.values())
    assert set(results["cpu"]["flags"]) <= set(serve.ISA_FLAGS)
    assert "| ort_int8 | 2 |" in printed
