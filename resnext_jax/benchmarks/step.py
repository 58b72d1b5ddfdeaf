"""Train/inference step throughput of a model against torchvision's, in the same process.

    python -m resnext_jax.benchmarks.step --model resnext50_32x4d --mode train --batch 8 --json out.json

Prints JAX img/s (median of `--runs` timed steps after a warm-up step), the jit compile seconds,
memory (XLA's `memory_analysis()` of the compiled step and the process's peak RSS from
`resource.getrusage`), model FLOPs (2 x multiply-adds of the forward, x3 for a train step) and the
fraction of a peak they reach (`--peak-tflops`, a known accelerator's spec-sheet peak, or on CPU an
f32/bf16 matmul timed in the same run; on an accelerator the timed matmul is reported beside the peak).
With torch installed it times torchvision's model on the same batch with `torch.set_num_threads(--threads)`,
taking turns with the JAX step in `--rounds` blocks of `--warmup` + `--runs` steps (see
`timing.time_in_blocks`), and prints the ratio.

The JAX train step is the training system's forward, loss and gradients (`training.step.loss_and_grads`) and
an AdamW update, on one device (`jax_step.py`); torchvision's is its model, cross-entropy and AdamW (or SGD,
`--torch-optimizer`) (`torch_step.py`).

On a GPU, torch runs on CUDA too, with `cudnn.benchmark` on; `--dtype bfloat16` is bf16 autocast there
(PyTorch AMP), and `--torch-channels-last` its channels_last layout. Both frameworks then share the GPU's
memory: unless `XLA_PYTHON_CLIENT_MEM_FRACTION` is set, JAX preallocates 45% of it instead of 75%.

`--devices N` (N > 1) also checks data parallelism in a subprocess with N host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`): the per-device FLOPs of the compiled
`shard_map` step should be the single-device total / N. The plain-`jit` step with a batch-sharded
input is shown for contrast (openxla/xla#47945: XLA does not partition grouped convs, so every
device recomputes the whole batch). See `data_parallel.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys

# Accelerator dense peaks in TFLOP/s (bf16 / f32 without sparsity), for MFU when --peak-tflops is not given.
KNOWN_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.0, "float32": 67.0},
    "NVIDIA H100": {"bfloat16": 989.0, "float32": 67.0},
    "NVIDIA H200": {"bfloat16": 989.0, "float32": 67.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 19.5},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 19.5},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.benchmarks.step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnext50_32x4d", help="a torchvision builder name")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (params stay float32); torch uses bf16 autocast for bfloat16",
    )
    parser.add_argument("--conv-impl", default="auto", help="grouped conv implementation (resnext_jax.ops)")
    parser.add_argument("--scan-blocks", action="store_true", help="run each stage's identical blocks under nn.scan")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per block; the median over all is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each block")
    parser.add_argument(
        "--rounds", type=int, default=2, help="blocks per framework: JAX and torch take turns, a block of steps each"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (XLA:CPU uses every core regardless)"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the torchvision baseline")
    parser.add_argument("--torch-channels-last", action="store_true", help="torch model and input in channels_last")
    parser.add_argument("--torch-optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="after timing, trace one JAX step with jax.profiler into DIR and print where its time goes",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak of the device for MFU; default: known accelerator peak, or a timed matmul on CPU",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=0,
        help="N > 1: check per-device FLOPs of the data-parallel step over N host devices",
    )
    parser.add_argument(
        "--flops-conv-impl", default="xla", help="conv impl for the --devices check (default xla: what GPUs/TPUs run)"
    )
    parser.add_argument(
        "--flops-resolution",
        type=int,
        default=64,
        help="resolution for the --devices check (FLOP ratios do not depend on it)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_flops-check", dest="flops_check", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_flops(model, mode: str, batch: int, resolution: int) -> float:
    """2 x forward multiply-adds (from the traced program), x3 for a train step (forward + 2x backward)."""
    import jax
    import jax.numpy as jnp

    from resnext_jax.models.init import variable_shapes
    from resnext_jax.summary import forward_macs

    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    return 2.0 * forward_macs(model, variable_shapes(model, resolution), images) * (3 if mode == "train" else 1)


def run(args, argv) -> dict:
    """Compiles and times the JAX step (and torchvision's); returns the results dict."""
    import jax
    import jax.numpy as jnp

    from resnext_jax import cpu
    from resnext_jax.benchmarks.data_parallel import run_flops_check_subprocess
    from resnext_jax.benchmarks.jax_step import make_jax_step
    from resnext_jax.benchmarks.timing import compile_step, jax_callable, measured_matmul_tflops, time_in_blocks
    from resnext_jax.benchmarks.torch_step import make_torch_step, torch_device
    from resnext_jax.models.registry import create_model
    from resnext_jax.ops.host_memory import huge_pages_enabled

    model = create_model(
        args.model, dtype=getattr(jnp, args.dtype), conv_impl=args.conv_impl, scan_blocks=args.scan_blocks
    )
    step, state, inputs = make_jax_step(model, args.mode, args.batch, args.resolution)
    compiled, compile_s, memory = compile_step(step, state, inputs)
    steps = {"jax": jax_callable(compiled, state, inputs, args.mode)}
    torch_version = torch_on = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: no torchvision baseline", file=sys.stderr)
        else:
            torch.set_num_threads(args.threads)
            torch_version = torch.__version__
            torch_on = torch_device(jax.default_backend())
            if torch_on == "cuda":
                torch.backends.cudnn.benchmark = True  # what a tuned PyTorch training script sets
            steps["torch"] = make_torch_step(
                args.model,
                args.mode,
                args.batch,
                args.resolution,
                args.dtype,
                args.torch_channels_last,
                args.torch_optimizer,
                device=torch_on,
            )
    timings = time_in_blocks(steps, args.runs, args.warmup, args.rounds)
    flops = model_flops(model, args.mode, args.batch, args.resolution)
    device = jax.devices()[0]
    peak_source = "--peak-tflops"
    peak = args.peak_tflops
    if peak is None and device.device_kind in KNOWN_PEAK_TFLOPS:
        peak, peak_source = KNOWN_PEAK_TFLOPS[device.device_kind][args.dtype], f"spec sheet {device.device_kind}"
    matmul_size = 2048 if device.platform == "cpu" else 8192
    matmul_tflops = measured_matmul_tflops(args.dtype, matmul_size)
    if peak is None and device.platform == "cpu":
        peak, peak_source = matmul_tflops, f"timed {matmul_size}^2 {args.dtype} matmul, this run"
    jax_s = timings["jax"]["median_s"]
    results = {
        "command": "python -m resnext_jax.benchmarks.step " + " ".join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "device": f"{device.platform} {device.device_kind}",
        "jax": jax.__version__,
        "torch": torch_version,
        "model": args.model,
        "mode": args.mode,
        "batch": args.batch,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "conv_impl": args.conv_impl,
        "scan_blocks": args.scan_blocks,
        "threads": args.threads,
        "runs": args.runs * args.rounds,
        "jax_img_s": args.batch / jax_s,
        "jax_step_s": timings["jax"]["all_s"],
        "compile_s": compile_s,
        "jax_minor_faults_per_step": timings["jax"]["minor_faults_per_step"],
        "jax_kernel_s_per_step": timings["jax"]["kernel_s_per_step"],
        "xla_memory_bytes": memory,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "malloc_huge_pages": huge_pages_enabled(),
        "model_gflops_per_step": flops / 1e9,
        "achieved_tflops": flops / jax_s / 1e12,
        "peak_tflops": peak,
        "peak_source": peak_source if peak else None,
        "fraction_of_peak": flops / jax_s / 1e12 / peak if peak else None,
        "matmul_tflops": matmul_tflops,
        "matmul_size": matmul_size,
        "fraction_of_matmul": flops / jax_s / 1e12 / matmul_tflops,
        # Which native CPU kernels the timed step uses, and why the others are not (resnext_jax.cpu.report()).
        "native_kernels": cpu.report() if device.platform == "cpu" else None,
    }
    if "torch" in timings:
        torch_s = timings["torch"]["median_s"]
        results.update(
            torch_img_s=args.batch / torch_s,
            torch_step_s=timings["torch"]["all_s"],
            ratio_jax_over_torch=torch_s / jax_s,
            torch_channels_last=args.torch_channels_last,
            torch_device=torch_on,
            torch_optimizer=args.torch_optimizer if args.mode == "train" else None,
        )
    if args.profile:
        from resnext_jax.benchmarks.timing import profile_step

        results["profile"] = profile_step(steps["jax"], compiled, args.profile)
    if args.devices > 1:
        results["data_parallel_flops"] = run_flops_check_subprocess(args, argv)
    return results


def format_results(r: dict) -> str:
    """Human-readable summary of `run`'s results."""
    lines = [
        f"# {r['command']}",
        f"# {r['date']} {r['machine']}, {r['device']}, jax {r['jax']}, torch {r['torch']}",
        f"{r['model']} {r['mode']} batch {r['batch']} {r['resolution']}px {r['dtype']} conv={r['conv_impl']} "
        f"scan_blocks={r['scan_blocks']}",
        f"  jax   {r['jax_img_s']:8.2f} img/s (median of {r['runs']}), compile {r['compile_s']:.1f} s",
    ]
    if "torch_img_s" in r:
        where = (
            f"{r['threads']} threads"
            if r.get("torch_device", "cpu") == "cpu"
            else f"{r['torch_device']}, cudnn.benchmark"
        )
        amp = ", bf16 autocast" if r["dtype"] == "bfloat16" else ""
        lines.append(
            f"  torch {r['torch_img_s']:8.2f} img/s ({where}{amp}, channels_last="
            f"{r['torch_channels_last']}); jax/torch = {r['ratio_jax_over_torch']:.2f}x"
        )
    mem = r["xla_memory_bytes"]
    if mem:
        lines.append(
            f"  memory: XLA memory_analysis temp {mem['temp_size_in_bytes'] / 2**20:.0f} MiB + args "
            f"{mem['argument_size_in_bytes'] / 2**20:.0f} MiB; process peak RSS {r['peak_rss_mb']:.0f} MiB; "
            f"malloc huge pages {'on' if r.get('malloc_huge_pages') else 'off'}"
        )
    if "jax_minor_faults_per_step" in r:
        lines.append(
            f"  JAX step: {r['jax_minor_faults_per_step']:.0f} page faults, "
            f"{r['jax_kernel_s_per_step']:.3f} s kernel CPU time (getrusage)"
        )
    line = f"  model FLOPs/step {r['model_gflops_per_step']:.1f} G, achieved {1e3 * r['achieved_tflops']:.1f} GFLOP/s"
    if r["peak_tflops"]:
        line += f" = {100 * r['fraction_of_peak']:.1f}% of {1e3 * r['peak_tflops']:.1f} GFLOP/s ({r['peak_source']})"
    lines.append(line)
    if r.get("matmul_tflops") and r["peak_source"] and not r["peak_source"].startswith("timed"):
        lines.append(
            f"    = {100 * r['fraction_of_matmul']:.1f}% of a {r['matmul_size']}^2 {r['dtype']} matmul "
            f"timed in this run ({1e3 * r['matmul_tflops']:.0f} GFLOP/s)"
        )
    kernels = r.get("native_kernels")
    if kernels:
        used = ", ".join(kernels["used"])
        why = kernels["unavailable_reason"] or "not used by this step"
        lines.append(
            f"  native CPU kernels ({kernels['isa']}): {used}" if used else f"  native CPU kernels: none ({why})"
        )
    prof = r.get("profile")
    if prof:
        lines.append(f"  profile of one step ({prof['total_ms']:.0f} ms of ops, trace in {prof['trace_dir']}):")
        lines += [
            f"    {ms:8.1f} ms {100 * ms / prof['total_ms']:5.1f}%  {kind}" for kind, ms in prof["by_kind_ms"].items()
        ]
        lines.append("  largest ops by JAX op_name:")
        lines += [f"    {ms:8.1f} ms  {op}" for op, ms in prof["by_op_ms"].items()]
    dp = r.get("data_parallel_flops")
    if dp and "error" in dp:
        lines.append(f"  data-parallel FLOPs check failed: {dp['error']}")
    elif dp:
        lines.append(
            f"  data parallel over {dp['devices']} devices ({dp['mode']}, conv={dp['conv_impl']}, "
            f"{dp['resolution']}px): per-device FLOPs x devices / single-device FLOPs = "
            f"shard_map {dp['shard_map_ratio']:.3f}, plain jit {dp['jit_ratio']:.3f} (1.0 = no recompute)"
        )
        if "shard_map_gradient_ratio" in dp:
            lines.append(
                f"    gradient only (the optimizer update runs on every replica's full params): shard_map "
                f"{dp['shard_map_gradient_ratio']:.3f}, plain jit {dp['jit_gradient_ratio']:.3f}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.flops_check:
        from resnext_jax.benchmarks.data_parallel import flops_check

        print(json.dumps(flops_check(args)))
        return 0
    if args.devices > 1:
        from resnext_jax.benchmarks.data_parallel import check_batch_divides

        check_batch_divides(args.batch, args.devices)
    if not args.no_torch:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # room for torch on the same GPU
    results = run(args, argv)
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    from resnext_jax.ops.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
