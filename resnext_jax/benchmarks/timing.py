"""Compiling, timing and profiling a step: the harness shared by the step benchmark and benchmarks/ab.py, floor.py
and stage_diagnostics.py.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import resource
import statistics
import time

import jax
import jax.numpy as jnp


def compile_step(step, state, inputs):
    """AOT-compiles `step`; returns (compiled, seconds, memory dict from XLA's memory_analysis())."""
    start = time.perf_counter()
    compiled = step.lower(state, *inputs).compile()
    seconds = time.perf_counter() - start
    memory = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for field in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            memory[field] = getattr(analysis, field, None)
    return compiled, seconds, memory


def jax_callable(compiled, state, inputs, mode: str):
    """Wraps a compiled step so repeated zero-arg calls thread the (donated) train state through and wait for
    the result: `mode` 'infer' returns nothing to thread, 'train' returns `(state, loss)`."""
    holder = [state]

    def call():
        if mode == "infer":
            jax.block_until_ready(compiled(holder[0], *inputs))
        else:
            holder[0], loss = compiled(holder[0], *inputs)
            jax.block_until_ready(loss)

    return call


def time_in_blocks(steps: dict, runs: int, warmup: int, rounds: int) -> dict:
    """Median seconds per call of each zero-arg callable, over `rounds` x `runs` timed calls.

    The callables take turns in blocks: in each round, each gets `warmup` untimed calls, then `runs`
    timed ones. Blocks, not single calls: alternating step by step slows the JAX step down with the memory
    state torch's step leaves behind, which no user of either framework sees; `rounds` > 1 still spreads
    load spikes over both (the measurements are in docs/benchmarks-history.md).
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
    return {
        key: {
            "median_s": statistics.median(t),
            "all_s": t,
            "minor_faults_per_step": faults[key] / len(t),
            "kernel_s_per_step": kernel_s[key] / len(t),
        }
        for key, t in times.items()
    }


def measured_matmul_tflops(dtype: str, size: int = 2048, runs: int = 9) -> float:
    """Median TFLOP/s of a jitted size x size matmul: the practical ceiling of this device, measured in this run."""
    # Random operands: a GPU multiplies constant or zero data faster than real data.
    a = jax.random.normal(jax.random.key(0), (size, size), getattr(jnp, dtype))
    matmul = jax.jit(lambda a: a @ a).lower(a).compile()
    matmul(a).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def profile_step(call, compiled, trace_dir: str, top: int = 15) -> dict:
    """Traces one call of the compiled step and sums the device time of its HLO ops.

    Ops are grouped two ways: by HLO kind (fusions by fusion kind: `kCustom` are library calls such as
    matmuls and library convolutions, `kLoop` the generated elementwise/reduction loops), and by the JAX
    op that produced them (`op_name` metadata, block indices folded so that e.g. every block's conv2
    backward adds up). Returns milliseconds per group, largest first.
    """
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
            ops[match.group(1)] = (
                match.group(2) + (f":{kind.group(1)}" if kind else ""),
                re.sub(r"(layer|block)\d_\d+", r"\1*", op_name.group(1)) if op_name else "?",
            )
    by_kind, by_op = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in ops:
            kind, op_name = ops[event["name"]]
            by_kind[kind] += event["dur"] / 1e3
            by_op[f"{kind} {op_name}"] += event["dur"] / 1e3
    return {
        "trace_dir": trace_dir,
        "total_ms": sum(by_kind.values()),
        "by_kind_ms": dict(by_kind.most_common(top)),
        "by_op_ms": dict(by_op.most_common(top)),
    }
