"""Micro-benchmark of the grouped-conv implementations on ResNeXt-50 32x4d shapes, vs torch.

Prints a markdown table: median milliseconds for the forward pass and for forward+VJP
(gradients with respect to input and kernel), jitted, after a warm-up call, plus the jit
compile seconds of the VJP. torch (`F.conv2d(groups=...)`, NCHW and channels_last) runs with
the same thread count in the same process, as the ratio baseline.

    python -m resnext_jax.ops.bench_conv [--dtypes float32,bfloat16] [--impls split,chunked]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from resnext_jax.ops.grouped_conv import conv2d

# (name, H=W, channels, stride) of the 3x3, 32-group convs of ResNeXt-50 32x4d at 224x224.
RESNEXT50_SHAPES = (
    ("s1 56x56x128", 56, 128, 1),
    ("s2 first 56->28x256", 56, 256, 2),
    ("s2 28x28x256", 28, 256, 1),
    ("s3 first 28->14x512", 28, 512, 2),
    ("s3 14x14x512", 14, 512, 1),
    ("s4 first 14->7x1024", 14, 1024, 2),
    ("s4 7x7x1024", 7, 1024, 1),
)
GROUPS = 32


def _time_interleaved(fns, reps):
    """Median ms of each zero-arg callable, run round-robin so load spikes hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [1e3 * statistics.median(bucket) for bucket in times]


def jax_step(impl, batch, size, channels, stride, dtype, grad):
    """A jitted, compiled forward (or forward+VJP) call and its compile seconds."""
    key_x, key_w, key_c = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (batch, size, size, channels), dtype)
    w = jax.random.normal(key_w, (3, 3, channels // GROUPS, channels), dtype) * 0.1
    conv = lambda x, w: conv2d(x, w, strides=(stride, stride), padding=((1, 1), (1, 1)),
                               groups=GROUPS, impl=impl)
    if grad:
        ct = jax.random.normal(key_c, jax.eval_shape(conv, x, w).shape, dtype)
        fn = jax.jit(lambda x, w, ct: jax.vjp(conv, x, w)[1](ct))
        args = (x, w, ct)
    else:
        fn = jax.jit(conv)
        args = (x, w)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s


def torch_step(layout, batch, size, channels, stride, dtype, grad):
    """torch's grouped conv forward (or forward+backward) as a zero-arg callable."""
    import torch
    import torch.nn.functional as F
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(tdtype).contiguous(
        memory_format=memory_format)
    w = (0.1 * torch.randn(channels, channels // GROUPS, 3, 3, generator=gen)).to(tdtype).contiguous(
        memory_format=memory_format)
    conv = lambda: F.conv2d(x, w, stride=stride, padding=1, groups=GROUPS)
    if not grad:
        def step():
            with torch.no_grad():
                conv()
        return step
    x.requires_grad_(True)
    w.requires_grad_(True)
    ct = torch.randn(conv().shape, generator=gen).to(tdtype).contiguous(memory_format=memory_format)

    def step():
        x.grad = w.grad = None
        conv().backward(ct)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="xla,split,chunked,blockdiag")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shapes", default="", help="substrings of shape names to keep")
    parser.add_argument("--no-xla-grad", action="store_true",
                        help="skip the VJP of 'xla' (seconds per call on CPU)")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    shapes = [s for s in RESNEXT50_SHAPES
              if not args.shapes or any(k in s[0] for k in args.shapes.split(","))]
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
    print(f"# python -m resnext_jax.ops.bench_conv {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} cpus, jax {jax.__version__} "
          f"{jax.default_backend()}, batch {args.batch}, median of {args.reps}, groups {GROUPS}")
    print("| shape | dtype | pass | " + " | ".join(
        impls + ([] if args.no_torch else ["torch NCHW", "torch NHWC"])) + " |")
    print("|---" * (3 + len(impls) + (0 if args.no_torch else 2)) + "|")
    for name, size, channels, stride in shapes:
        for dtype in args.dtypes.split(","):
            for grad in (False, True):
                labels, steps, compiles = [], [], {}
                for impl in impls:
                    if grad and impl == "xla" and args.no_xla_grad:
                        continue
                    step, compiles[impl] = jax_step(impl, args.batch, size, channels, stride,
                                                    getattr(jnp, dtype), grad)
                    labels.append(impl)
                    steps.append(step)
                if not args.no_torch:
                    for layout in ("nchw", "channels_last"):
                        labels.append(layout)
                        steps.append(torch_step(layout, args.batch, size, channels, stride, dtype,
                                                grad))
                ms = dict(zip(labels, _time_interleaved(steps, args.reps)))
                cells = [f"{ms[i]:.1f} ({compiles[i]:.1f}s)" if i in ms else "skip" for i in impls]
                if not args.no_torch:
                    cells += [f"{ms['nchw']:.1f}", f"{ms['channels_last']:.1f}"]
                print(f"| {name} | {dtype} | {'fwd+vjp' if grad else 'fwd'} | " + " | ".join(cells)
                      + " |", flush=True)
    print("# cells: median ms (jit compile s); torch cells: median ms")


if __name__ == "__main__":
    main()
