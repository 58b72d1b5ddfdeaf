"""Train/inference step throughput of a model against torchvision's, in the same process.

    python -m resnext_jax.benchmarks.step --model resnext50_32x4d --mode train --batch 8 --json out.json

Prints JAX img/s (median of `--runs` timed steps after a warm-up step), the jit compile seconds,
memory (XLA's `memory_analysis()` of the compiled step and the process's peak RSS from
`resource.getrusage`), model FLOPs (2 x multiply-adds of the forward, x3 for a train step) and the
fraction of a peak they reach (`--peak-tflops`, a known accelerator's spec-sheet peak, or on CPU an
f32/bf16 matmul timed in the same run; on an accelerator the timed matmul is reported beside the peak).
With torch installed it times torchvision's model on the same batch with `torch.set_num_threads(--threads)`,
taking turns with the JAX step in `--rounds` blocks of `--warmup` + `--runs` steps (see `time_in_blocks`),
and prints the ratio.

On a GPU, torch runs on CUDA too, with `cudnn.benchmark` on; `--dtype bfloat16` is bf16 autocast there
(PyTorch AMP), and `--torch-channels-last` its channels_last layout. Both frameworks then share the GPU's
memory: unless `XLA_PYTHON_CLIENT_MEM_FRACTION` is set, JAX preallocates 45% of it instead of 75%.

`--devices N` (N > 1) also checks data parallelism in a subprocess with N host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`): the per-device FLOPs of the compiled
`shard_map` step should be the single-device total / N. The plain-`jit` step with a batch-sharded
input is shown for contrast (openxla/xla#47945: XLA does not partition grouped convs, so every
device recomputes the whole batch).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

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
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (params stay float32); torch uses bf16 autocast for bfloat16")
    parser.add_argument("--conv-impl", default="auto", help="grouped conv implementation (resnext_jax.ops)")
    parser.add_argument("--scan-blocks", action="store_true", help="run each stage's identical blocks under nn.scan")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per block; the median over all is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each block")
    parser.add_argument("--rounds", type=int, default=2,
                        help="blocks per framework: JAX and torch take turns, a block of steps each")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (XLA:CPU uses every core regardless)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torchvision baseline")
    parser.add_argument("--torch-channels-last", action="store_true", help="torch model and input in channels_last")
    parser.add_argument("--torch-optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="after timing, trace one JAX step with jax.profiler into DIR and print where its time goes")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak of the device for MFU; default: known accelerator peak, or a timed matmul on CPU")
    parser.add_argument("--devices", type=int, default=0,
                        help="N > 1: check per-device FLOPs of the data-parallel step over N host devices")
    parser.add_argument("--flops-conv-impl", default="xla",
                        help="conv impl for the --devices check (default xla: what GPUs/TPUs run)")
    parser.add_argument("--flops-resolution", type=int, default=64,
                        help="resolution for the --devices check (FLOP ratios do not depend on it)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--_flops-check", dest="flops_check", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- JAX steps
def make_jax_step(model, mode: str, batch: int, resolution: int, num_classes: int = 1000):
    """Returns `(step, state, inputs)` for one jitted train or inference step on one device.

    The train step is the training system's math: softmax cross-entropy, `value_and_grad`, BatchNorm
    statistics from `mutable=['batch_stats']`, and an `optax.adamw` update; its state is donated.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from resnext_jax import ops
    from resnext_jax.ops import step_compiler_options

    # benchmarks/ab.py runs this with older revisions of the package too, from before the inference options.
    inference_compiler_options = getattr(ops, "inference_compiler_options", step_compiler_options)

    rng = jax.random.key(0)
    images = jax.random.normal(rng, (batch, resolution, resolution, 3), jnp.float32)
    labels = jax.random.randint(rng, (batch,), 0, num_classes)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, resolution, resolution, 3)), train=False))(rng)
    if mode == "infer":
        step = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=inference_compiler_options())
        return step, variables, (images,)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    step = jax.jit(_train_step_fn(model, tx, num_classes), donate_argnums=(0,),
                   compiler_options=step_compiler_options())
    return step, state, (images, labels)


def _train_step_fn(model, tx, num_classes, axis_name: str | None = None, update: bool = True):
    """`(state, images, labels) -> (state, loss)`; with `axis_name`, gradients are averaged over it.

    `update=False` stops after the (averaged) gradients and returns `(grads, loss)`: the part of the step
    whose work data parallelism splits; the optimizer update runs on every device's full copy of the params.
    """
    import jax
    import optax

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes)).mean()
        return loss, updates["batch_stats"]

    def step(state, images, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        if axis_name:
            grads, loss = jax.lax.pmean((grads, loss), axis_name)
        if not update:
            return grads, loss
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return step


def compile_step(step, state, inputs):
    """AOT-compiles `step`; returns (compiled, seconds, memory dict from XLA's memory_analysis())."""
    start = time.perf_counter()
    compiled = step.lower(state, *inputs).compile()
    seconds = time.perf_counter() - start
    memory = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "alias_size_in_bytes", "generated_code_size_in_bytes"):
            memory[field] = getattr(analysis, field, None)
    return compiled, seconds, memory


def model_flops(model, mode: str, batch: int, resolution: int) -> float:
    """2 x forward multiply-adds (from the traced program), x3 for a train step (forward + 2x backward)."""
    import jax
    import jax.numpy as jnp
    from resnext_jax.summary import count_macs

    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x[:1], train=False), images)
    nominal = model.clone(conv_impl="xla")  # the model's FLOPs, not the zeros of a block-diagonal implementation
    macs = count_macs(lambda v, x: nominal.apply(v, x, train=False), variables, images)
    return 2.0 * macs * (3 if mode == "train" else 1)


def measured_matmul_tflops(dtype: str, size: int = 2048, runs: int = 9) -> float:
    """Median TFLOP/s of a jitted size x size matmul: the practical ceiling of this device, measured in this run."""
    import jax
    import jax.numpy as jnp

    # Random operands: a GPU multiplies constant or zero data faster than real data.
    a = jax.random.normal(jax.random.key(0), (size, size), getattr(jnp, dtype))
    matmul = jax.jit(lambda a: a @ a).lower(a).compile()
    matmul(a).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------------------------------ torch steps
def torch_device(jax_platform: str) -> str:
    """torch's device for the baseline: 'cuda' when JAX runs on a GPU and torch sees one, else 'cpu'."""
    import torch

    if jax_platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def make_torch_step(name: str, mode: str, batch: int, resolution: int, dtype: str, channels_last: bool,
                    optimizer: str, num_classes: int = 1000, device: str = "cpu"):
    """Returns a zero-arg callable running one torchvision train (loss, backward, optimizer) or no-grad step.

    On 'cuda' the call waits for the GPU (`torch.cuda.synchronize`), as the JAX step waits for its result;
    `bfloat16` is autocast (PyTorch AMP) on either device, with float32 params, like the JAX model.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=num_classes).to(device)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bfloat16" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        if autocast is None:
            return model(images)
        with autocast():
            return model(images)

    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode():
                forward()
            sync()
        return infer
    model.train()
    opt = (torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), 0.1, momentum=0.9))
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward().float(), labels).backward()
        opt.step()
        sync()
    return train


# ------------------------------------------------------------------------------------------- timing
def time_in_blocks(steps: dict, runs: int, warmup: int, rounds: int) -> dict:
    """Median seconds per call of each zero-arg callable, over `rounds` x `runs` timed calls.

    The callables take turns in blocks: in each round, each gets `warmup` untimed calls, then `runs`
    timed ones. Blocks, not single calls, because alternating step by step made the JAX step 1.3-2.6x
    slower than alone (RegNetY-1.6GF train: 0.73-1.88 s vs 0.70-0.74 s) from the memory state torch's
    step leaves behind, which no user of either framework sees; `rounds` > 1 still spreads load spikes
    over both (docs/benchmarks.md).
    """
    times = {key: [] for key in steps}
    faults = dict.fromkeys(steps, 0)
    kernel_s = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for key, fn in steps.items():
            for _ in range(warmup):
                fn()
            before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults[key] += after.ru_minflt - before.ru_minflt
            kernel_s[key] += after.ru_stime - before.ru_stime
    # Page faults and kernel CPU time per timed step (getrusage: the whole process, but only one side runs at a time).
    return {key: {"median_s": statistics.median(t), "all_s": t, "minor_faults_per_step": faults[key] / len(t),
                  "kernel_s_per_step": kernel_s[key] / len(t)} for key, t in times.items()}


def _jax_callable(compiled, state, inputs, mode):
    """Wraps a compiled step so repeated calls thread the (donated) train state through."""
    import jax

    holder = [state]

    def call():
        if mode == "infer":
            jax.block_until_ready(compiled(holder[0], *inputs))
        else:
            holder[0], loss = compiled(holder[0], *inputs)
            jax.block_until_ready(loss)
    return call


def profile_step(call, compiled, trace_dir: str, top: int = 15) -> dict:
    """Traces one call of the compiled step and sums the device time of its HLO ops.

    Ops are grouped two ways: by HLO kind (fusions by fusion kind: `kCustom` are library calls such as
    matmuls and library convolutions, `kLoop` the generated elementwise/reduction loops), and by the JAX
    op that produced them (`op_name` metadata, block indices folded so that e.g. every block's conv2
    backward adds up). Returns milliseconds per group, largest first.
    """
    import collections
    import glob
    import gzip
    import re

    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        call()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = {}
    for line in compiled.as_text().splitlines():
        # The result type is one shape or a tuple of them (a custom call with two outputs).
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(", line)
        if match:
            kind = re.search(r"kind=(\w+)", line) if match.group(2) == "fusion" else None
            op_name = re.search(r'op_name="([^"]*)"', line)
            ops[match.group(1)] = (match.group(2) + (f":{kind.group(1)}" if kind else ""),
                                   re.sub(r"(layer|block)\d_\d+", r"\1*", op_name.group(1)) if op_name else "?")
    by_kind, by_op = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in ops:
            kind, op_name = ops[event["name"]]
            by_kind[kind] += event["dur"] / 1e3
            by_op[f"{kind} {op_name}"] += event["dur"] / 1e3
    return {"trace_dir": trace_dir, "total_ms": sum(by_kind.values()),
            "by_kind_ms": dict(by_kind.most_common(top)), "by_op_ms": dict(by_op.most_common(top))}


# -------------------------------------------------------------------------------- data-parallel FLOPs
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
    from jax.sharding import NamedSharding, PartitionSpec as P

    from resnext_jax.models.registry import create_model

    num = jax.device_count()
    check_batch_divides(args.batch, num)
    # Auto axes: the plain-jit contrast is GSPMD propagation from a batch-sharded input, not explicit sharding types.
    mesh = jax.make_mesh((num,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    res, classes = args.flops_resolution, 1000
    fields = dict(conv_impl=args.flops_conv_impl, scan_blocks=args.scan_blocks)
    local = create_model(args.model, **fields)
    synced = create_model(args.model, bn_axis_name="data", **fields)
    rng = jax.random.key(0)
    images = jnp.zeros((args.batch, res, res, 3))
    labels = jnp.zeros((args.batch,), jnp.int32)
    variables = jax.eval_shape(lambda: local.init(rng, images[:1], train=False))
    tx = optax.adamw(1e-3)

    def step_for(model, axis_name=None, update=True):
        if args.mode == "infer":
            return lambda v, x, y: model.apply(v, x, train=False)
        return _train_step_fn(model, tx, classes, axis_name, update)

    state = variables if args.mode == "infer" else (
        variables["params"], variables["batch_stats"], jax.eval_shape(tx.init, variables["params"]))

    def flops(fn, sharded_batch: bool = False):
        def spec(tree, sharding):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
        args = (state, images, labels)
        if sharded_batch:
            args = (spec(state, NamedSharding(mesh, P())), *spec((images, labels), NamedSharding(mesh, P("data"))))
        return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])

    def shard_mapped(update=True):
        out_specs = P("data") if args.mode == "infer" else (P(), P())
        return jax.shard_map(step_for(synced, "data", update), mesh=mesh, in_specs=(P(), P("data"), P("data")),
                             out_specs=out_specs, check_vma=False)

    single = flops(step_for(local))
    per_device_shard_map = flops(shard_mapped(), sharded_batch=True)
    per_device_jit = flops(step_for(local), sharded_batch=True)
    result = {"devices": num, "conv_impl": args.flops_conv_impl, "resolution": res, "mode": args.mode,
              "single_device_flops": single,
              "shard_map_per_device_flops": per_device_shard_map,
              "shard_map_ratio": per_device_shard_map * num / single,
              "jit_per_device_flops": per_device_jit,
              "jit_ratio": per_device_jit * num / single}
    if args.mode == "train":
        # Without the optimizer update, which every data-parallel replica runs in full on its copy of the params.
        grads_single = flops(step_for(local, update=False))
        result["shard_map_gradient_ratio"] = flops(shard_mapped(update=False), sharded_batch=True) * num / grads_single
        result["jit_gradient_ratio"] = flops(step_for(local, update=False), sharded_batch=True) * num / grads_single
    return result


def run_flops_check_subprocess(args, argv) -> dict:
    """Runs `flops_check` in a child process with N host devices (XLA_FLAGS must be set before jax loads)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "resnext_jax.benchmarks.step", *argv, "--_flops-check"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.strip().splitlines() if "Error" in line or "error" in line]
        return {"error": (errors or result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def run(args, argv) -> dict:
    """Compiles and times the JAX step (and torchvision's); returns the results dict."""
    import jax
    import jax.numpy as jnp

    from resnext_jax.models.registry import create_model
    from resnext_jax.ops.host_memory import huge_pages_enabled

    model = create_model(args.model, dtype=getattr(jnp, args.dtype), conv_impl=args.conv_impl,
                         scan_blocks=args.scan_blocks)
    step, state, inputs = make_jax_step(model, args.mode, args.batch, args.resolution)
    compiled, compile_s, memory = compile_step(step, state, inputs)
    steps = {"jax": _jax_callable(compiled, state, inputs, args.mode)}
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
            steps["torch"] = make_torch_step(args.model, args.mode, args.batch, args.resolution, args.dtype,
                                             args.torch_channels_last, args.torch_optimizer, device=torch_on)
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
        "device": f"{device.platform} {device.device_kind}", "jax": jax.__version__, "torch": torch_version,
        "model": args.model, "mode": args.mode, "batch": args.batch, "resolution": args.resolution,
        "dtype": args.dtype, "conv_impl": args.conv_impl, "scan_blocks": args.scan_blocks,
        "threads": args.threads, "runs": args.runs * args.rounds,
        "jax_img_s": args.batch / jax_s, "jax_step_s": timings["jax"]["all_s"], "compile_s": compile_s,
        "jax_minor_faults_per_step": timings["jax"]["minor_faults_per_step"],
        "jax_kernel_s_per_step": timings["jax"]["kernel_s_per_step"],
        "xla_memory_bytes": memory, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "malloc_huge_pages": huge_pages_enabled(),
        "model_gflops_per_step": flops / 1e9, "achieved_tflops": flops / jax_s / 1e12,
        "peak_tflops": peak, "peak_source": peak_source if peak else None,
        "fraction_of_peak": flops / jax_s / 1e12 / peak if peak else None,
        "matmul_tflops": matmul_tflops, "matmul_size": matmul_size,
        "fraction_of_matmul": flops / jax_s / 1e12 / matmul_tflops,
    }
    if "torch" in timings:
        torch_s = timings["torch"]["median_s"]
        results.update(torch_img_s=args.batch / torch_s, torch_step_s=timings["torch"]["all_s"],
                       ratio_jax_over_torch=torch_s / jax_s, torch_channels_last=args.torch_channels_last,
                       torch_device=torch_on,
                       torch_optimizer=args.torch_optimizer if args.mode == "train" else None)
    if args.profile:
        results["profile"] = profile_step(steps["jax"], compiled, args.profile)
    if args.devices > 1:
        results["data_parallel_flops"] = run_flops_check_subprocess(args, argv)
    return results


def format_results(r: dict) -> str:
    """Human-readable summary of `run`'s results."""
    lines = [f"# {r['command']}", f"# {r['date']} {r['machine']}, {r['device']}, jax {r['jax']}, torch {r['torch']}",
             f"{r['model']} {r['mode']} batch {r['batch']} {r['resolution']}px {r['dtype']} conv={r['conv_impl']} "
             f"scan_blocks={r['scan_blocks']}",
             f"  jax   {r['jax_img_s']:8.2f} img/s (median of {r['runs']}), compile {r['compile_s']:.1f} s"]
    if "torch_img_s" in r:
        where = (f"{r['threads']} threads" if r.get("torch_device", "cpu") == "cpu"
                 else f"{r['torch_device']}, cudnn.benchmark")
        amp = ", bf16 autocast" if r["dtype"] == "bfloat16" else ""
        lines.append(f"  torch {r['torch_img_s']:8.2f} img/s ({where}{amp}, channels_last="
                     f"{r['torch_channels_last']}); jax/torch = {r['ratio_jax_over_torch']:.2f}x")
    mem = r["xla_memory_bytes"]
    if mem:
        lines.append(f"  memory: XLA memory_analysis temp {mem['temp_size_in_bytes'] / 2**20:.0f} MiB + args "
                     f"{mem['argument_size_in_bytes'] / 2**20:.0f} MiB; process peak RSS {r['peak_rss_mb']:.0f} MiB; "
                     f"malloc huge pages {'on' if r.get('malloc_huge_pages') else 'off'}")
    if "jax_minor_faults_per_step" in r:
        lines.append(f"  JAX step: {r['jax_minor_faults_per_step']:.0f} page faults, "
                     f"{r['jax_kernel_s_per_step']:.3f} s kernel CPU time (getrusage)")
    line = f"  model FLOPs/step {r['model_gflops_per_step']:.1f} G, achieved {1e3 * r['achieved_tflops']:.1f} GFLOP/s"
    if r["peak_tflops"]:
        line += (f" = {100 * r['fraction_of_peak']:.1f}% of {1e3 * r['peak_tflops']:.1f} GFLOP/s "
                 f"({r['peak_source']})")
    lines.append(line)
    if r.get("matmul_tflops") and r["peak_source"] and not r["peak_source"].startswith("timed"):
        lines.append(f"    = {100 * r['fraction_of_matmul']:.1f}% of a {r['matmul_size']}^2 {r['dtype']} matmul "
                     f"timed in this run ({1e3 * r['matmul_tflops']:.0f} GFLOP/s)")
    prof = r.get("profile")
    if prof:
        lines.append(f"  profile of one step ({prof['total_ms']:.0f} ms of ops, trace in {prof['trace_dir']}):")
        lines += [f"    {ms:8.1f} ms {100 * ms / prof['total_ms']:5.1f}%  {kind}" for kind, ms in prof["by_kind_ms"].items()]
        lines.append("  largest ops by JAX op_name:")
        lines += [f"    {ms:8.1f} ms  {op}" for op, ms in prof["by_op_ms"].items()]
    dp = r.get("data_parallel_flops")
    if dp and "error" in dp:
        lines.append(f"  data-parallel FLOPs check failed: {dp['error']}")
    elif dp:
        lines.append(f"  data parallel over {dp['devices']} devices ({dp['mode']}, conv={dp['conv_impl']}, "
                     f"{dp['resolution']}px): per-device FLOPs x devices / single-device FLOPs = "
                     f"shard_map {dp['shard_map_ratio']:.3f}, plain jit {dp['jit_ratio']:.3f} (1.0 = no recompute)")
        if "shard_map_gradient_ratio" in dp:
            lines.append(f"    gradient only (the optimizer update runs on every replica's full params): shard_map "
                         f"{dp['shard_map_gradient_ratio']:.3f}, plain jit {dp['jit_gradient_ratio']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.flops_check:
        print(json.dumps(flops_check(args)))
        return 0
    if args.devices > 1:
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
