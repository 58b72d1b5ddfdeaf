"""CPU serving benchmark in one process: the same random-init model through every way this project can serve it.

    python -m resnext_jax.benchmarks.serve --model resnext50_32x4d --batch 1 8 32

Paths: JAX float32 (`model.apply` under jit, the native CPU kernels) and bfloat16; onnxruntime float32 and int8 (the
exporter's own ONNX writer and QDQ quantization, calibrated here on random images: speed does not depend on the
pixels, and accuracy is measured by `export --quantize int8` on real data); torch float32 and bfloat16 autocast,
channels_last, holding the same weights (`to_torchvision`); OpenVINO on the int8 file when `openvino` is installed.
For each batch: img/s (from the median latency), p50 and p95 latency, and each path's max-abs logit difference from
JAX float32 on one batch, so a fast wrong path shows. Paths run in blocks (warm-up, then `--runs` timed calls),
in `--rounds` rounds. Also printed: the CPU, its ISA flags (avx512_vnni, amx_int8, amx_bf16...) and the process's
peak RSS after each path (cumulative: one process holds every path). Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

PATHS = ("jax_f32", "jax_bf16", "ort_f32", "ort_int8", "torch_f32", "torch_bf16", "openvino_int8")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_description() -> dict:
    """{'model': CPU name, 'flags': the ISA_FLAGS it has, 'cores': logical CPUs} from /proc/cpuinfo."""
    import os

    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": name, "flags": [flag for flag in ISA_FLAGS if flag in flags], "cores": os.cpu_count()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jax_path(module, variables, dtype):
    import jax
    import jax.numpy as jnp

    model = module.clone(dtype=jnp.dtype(dtype))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(jnp.float32))
    return lambda images: np.asarray(forward(variables, images))


def _ort_paths(module, variables, resolution: int, calibration: list, wanted) -> dict:
    from resnext_jax.export.onnx_export import session
    from resnext_jax.export.onnx_graph import build
    from resnext_jax.export.quantize import quantize_bytes

    data = build(module, variables, batch=None, resolution=resolution).SerializeToString()
    paths, files = {}, {"ort_f32": data}
    if "ort_int8" in wanted or "openvino_int8" in wanted:
        files["ort_int8"] = quantize_bytes(data, calibration)
    for name in ("ort_f32", "ort_int8"):
        if name in wanted:
            runner = session(files[name])
            paths[name] = lambda images, runner=runner: runner.run(None, {"images": images})[0]
    if "openvino_int8" in wanted:
        try:
            import openvino
        except ImportError:
            print("openvino_int8: skipped (pip install openvino to add it)", file=sys.stderr)
        else:
            compiled = openvino.Core().compile_model(openvino.Core().read_model(files["ort_int8"]), "CPU")
            paths["openvino_int8"] = lambda images: np.asarray(compiled(images)[0])
    return paths


def _torch_paths(name: str, variables, num_classes: int, wanted) -> dict:
    import torch
    import torchvision

    from resnext_jax.convert import to_torchvision

    model = getattr(torchvision.models, name)(num_classes=num_classes)
    model.load_state_dict(to_torchvision(name, variables), strict=True)
    model = model.eval().to(memory_format=torch.channels_last)

    def path(bf16: bool):
        def run(images):
            x = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC memory is channels_last NCHW
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return model(x).float().numpy()

        return run

    return {key: path(key == "torch_bf16") for key in ("torch_f32", "torch_bf16") if key in wanted}


def build_paths(args) -> dict:
    """{path name: images (B, R, R, 3) float32 numpy -> logits numpy} for the wanted paths that can run here."""
    import jax

    from resnext_jax import create_model
    from resnext_jax.models import init_variables

    module = create_model(args.model)
    variables = jax.device_get(init_variables(module, jax.random.key(0), args.resolution))
    wanted, paths = set(args.paths), {}
    for dtype in ("f32", "bf16"):
        if f"jax_{dtype}" in wanted:
            paths[f"jax_{dtype}"] = _jax_path(module, variables, "float32" if dtype == "f32" else "bfloat16")
    if wanted & {"ort_f32", "ort_int8", "openvino_int8"}:
        rng = np.random.default_rng(1)
        calibration = [
            rng.standard_normal((4, args.resolution, args.resolution, 3)).astype(np.float32)
            for _ in range(args.calibration_batches)
        ]
        paths.update(_ort_paths(module.clone(conv_impl="xla"), variables, args.resolution, calibration, wanted))
    if wanted & {"torch_f32", "torch_bf16"}:
        try:
            paths.update(_torch_paths(args.model, variables, module.num_classes, wanted))
        except (ImportError, AttributeError, KeyError, ValueError) as error:  # no torch, or a timm-only name
            print(f"torch: skipped ({type(error).__name__}: {error})", file=sys.stderr)
    return {name: paths[name] for name in PATHS if name in paths}


def run(args) -> dict:
    paths = build_paths(args)
    rng = np.random.default_rng(0)
    results = {"cpu": cpu_description(), "model": args.model, "resolution": args.resolution, "rows": []}
    for batch in args.batch:
        images = rng.standard_normal((batch, args.resolution, args.resolution, 3)).astype(np.float32)
        reference = paths["jax_f32"](images) if "jax_f32" in paths else None
        latencies = {name: [] for name in paths}
        differences = {}
        for name, call in paths.items():
            logits = call(images)  # compile / first-run costs stay out of the timings
            differences[name] = None if reference is None else float(np.max(np.abs(logits - reference)))
        for _ in range(args.rounds):
            for name, call in paths.items():
                for _ in range(args.warmup):
                    call(images)
                for _ in range(args.runs):
                    start = time.perf_counter()
                    call(images)
                    latencies[name].append(time.perf_counter() - start)
        for name in paths:
            seconds = np.asarray(latencies[name])
            results["rows"].append(
                {
                    "path": name,
                    "batch": batch,
                    "images_per_s": batch / float(np.median(seconds)),
                    "p50_ms": float(np.percentile(seconds, 50)) * 1e3,
                    "p95_ms": float(np.percentile(seconds, 95)) * 1e3,
                    "max_abs_vs_jax_f32": differences[name],
                    "peak_rss_mib": peak_rss_mib(),
                }
            )
    return results


def format_results(results: dict, argv: list[str]) -> str:
    cpu = results["cpu"]
    lines = [
        f"python -m resnext_jax.benchmarks.serve {' '.join(argv)}",
        f"{cpu['model']}, {cpu['cores']} logical CPUs, flags: {', '.join(cpu['flags']) or 'none of ' + str(ISA_FLAGS)}",
        f"{results['model']} at {results['resolution']}x{results['resolution']}, random weights",
        "",
        "| path | batch | img/s | p50 ms | p95 ms | max-abs vs jax_f32 | peak RSS MiB (cumulative) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        difference = "-" if row["max_abs_vs_jax_f32"] is None else f"{row['max_abs_vs_jax_f32']:.2g}"
        lines.append(
            f"| {row['path']} | {row['batch']} | {row['images_per_s']:.1f} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {difference} | {row['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.benchmarks.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--runs", type=int, default=5, help="timed calls per path, batch and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=4, help="int8: random batches of 4 images")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results = run(args)
    print(format_results(results, argv))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
