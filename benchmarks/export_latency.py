"""Serving latency of the exported files against `model.apply` under jit, on the CPU (issue 20).

    python benchmarks/export_latency.py --model resnext50_32x4d --batches 1 32

Exports a random-init model (weights do not change the latency) as StableHLO and as ONNX into a temporary
directory with `resnext_jax.export.export`, then times, per batch size, the median of `--runs` calls after two
warm-up calls of:
  - `model.apply` under jit with the model as trained (conv_impl='auto': our native CPU kernels where they run),
  - the StableHLO artifact through `jax.jit(jax.export.deserialize(...).call)` (pure XLA: no native kernels),
  - the ONNX file in onnxruntime's CPU provider (its default threads: one per physical core).
Prints a table, the artifact sizes and the command line, CPU and date to record beside them.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import resnext_jax
from resnext_jax.export import export, load
from resnext_jax.inference.loader import LoadedModel, Preprocessing, default_class_names
from resnext_jax.models.init import init_variables


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def median_seconds(run, images, runs: int) -> float:
    for _ in range(2):
        run(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    module = resnext_jax.create_model(args.model)
    variables = init_variables(module, jax.random.key(0), 64)
    info = resnext_jax.model_info(args.model)
    loaded = LoadedModel(
        name=args.model,
        module=module,
        variables=variables,
        preprocessing=Preprocessing(
            resize_size=info.resize_v2 or info.resize_v1 or 256,
            crop_size=args.resolution,
            mean=info.mean,
            std=info.std,
            class_names=default_class_names(1000),
        ),
        source={"kind": "benchmark"},
        config=None,
        model_kwargs={},
    )
    apply = jax.jit(lambda images: module.apply(variables, images, train=False))
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as directory:
        served = {}
        for fmt in ("stablehlo", "onnx"):
            path = os.path.join(directory, f"{args.model}.{fmt}")
            start = time.perf_counter()
            export(loaded, path, format=fmt)
            print(f"exported {fmt} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            sizes[fmt] = os.path.getsize(path)
            served[fmt] = load(path).run  # the bare callable: no input checks in the timing
        runners = {
            "model.apply (jit, conv_impl=auto)": lambda x: jax.block_until_ready(apply(x)),
            "StableHLO artifact (jax)": lambda x: jax.block_until_ready(served["stablehlo"](x)),
            "ONNX (onnxruntime)": served["onnx"],
        }
        rng = np.random.default_rng(0)
        for batch in args.batches:
            images = rng.standard_normal((batch, args.resolution, args.resolution, 3)).astype(np.float32)
            for name, run in runners.items():
                seconds = median_seconds(run, images, args.runs)
                rows.append((batch, name, seconds))
                print(f"batch {batch:3d}  {name:36s} {seconds * 1e3:9.1f} ms  {batch / seconds:7.1f} img/s", flush=True)

    import onnxruntime

    print(
        f"\n{args.model} at {args.resolution}x{args.resolution}, float32, median of {args.runs} calls after 2 "
        f"warm-up calls"
    )
    print("| batch | runtime | median latency | images/s |\n|---|---|---|---|")
    for batch, name, seconds in rows:
        print(f"| {batch} | {name} | {seconds * 1e3:.1f} ms | {batch / seconds:.1f} |")
    print(f"artifact sizes: StableHLO {sizes['stablehlo'] / 2**20:.1f} MiB, ONNX {sizes['onnx'] / 2**20:.1f} MiB")
    print(f"command: python benchmarks/export_latency.py {' '.join(sys.argv[1:])}")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; jax {jax.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; {datetime.date.today().isoformat()}"
    )


if __name__ == "__main__":
    main()
