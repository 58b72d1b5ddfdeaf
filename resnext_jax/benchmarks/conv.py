"""Micro-benchmark of the conv implementations on ResNeXt-50 / ResNet-50 shapes, vs torch.

Prints a markdown table: median milliseconds for the forward pass and for forward+VJP
(gradients with respect to input and kernel), jitted, after a warm-up call, plus the jit
compile seconds of the VJP. torch (`F.conv2d(groups=...)`, NCHW and channels_last) runs with
the same thread count in the same process, as the ratio baseline; on CUDA when JAX runs on a GPU.

    python -m resnext_jax.benchmarks.conv [--dtypes float32,bfloat16] [--impls split,chunked]
    python -m resnext_jax.benchmarks.conv --shape-set dense --impls xla,gemm --dtypes float32

`--shape-set grouped` (default) is ResNeXt-50's 3x3, 32-group convs; `regnet` RegNetY-1.6GF's 24-channel-group
ones; `dense` is ResNet-50's dense 1x1 and 3x3 convs, where `gemm` (one matmul) is compared with XLA's
convolution.
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

# (name, H=W, in channels, out channels, kernel size, stride, groups) at 224x224 input.
SHAPE_SETS = {
    # The 3x3, 32-group convs of ResNeXt-50 32x4d.
    "grouped": tuple(
        (name, size, channels, channels, 3, stride, 32)
        for name, size, channels, stride in (
            ("s1 56x56x128", 56, 128, 1),
            ("s2 first 56->28x256", 56, 256, 2),
            ("s2 28x28x256", 28, 256, 1),
            ("s3 first 28->14x512", 28, 512, 2),
            ("s3 14x14x512", 14, 512, 1),
            ("s4 first 14->7x1024", 14, 1024, 2),
            ("s4 7x7x1024", 7, 1024, 1),
        )
    ),
    # The 3x3 convs of RegNetY-1.6GF: groups of 24 channels.
    "regnet": tuple(
        (name, size, channels, channels, 3, stride, channels // 24)
        for name, size, channels, stride in (
            ("s1 first 112->56x48", 112, 48, 2),
            ("s2 28x28x120", 28, 120, 1),
            ("s3 14x14x336", 14, 336, 1),
            ("s4 7x7x888", 7, 888, 1),
        )
    ),
    # Dense convs of ResNet-50's bottlenecks.
    "dense": (
        ("56x56 1x1 64->256", 56, 64, 256, 1, 1, 1),
        ("56x56 1x1 256->64", 56, 256, 64, 1, 1, 1),
        ("28x28 1x1 512->128", 28, 512, 128, 1, 1, 1),
        ("7x7 1x1 2048->512", 7, 2048, 512, 1, 1, 1),
        ("56x56 3x3 64->64", 56, 64, 64, 3, 1, 1),
        ("28x28 3x3 128->128", 28, 128, 128, 3, 1, 1),
        ("stem 224x224 7x7/2 3->64", 224, 3, 64, 7, 2, 1),
    ),
}


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


def jax_step(impl, batch, shape, dtype, grad):
    """A jitted, compiled forward (or forward+VJP) call and its compile seconds."""
    _, size, cin, cout, k, stride, groups = shape
    key_x, key_w, key_c = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (batch, size, size, cin), dtype)
    w = jax.random.normal(key_w, (k, k, cin // groups, cout), dtype) * 0.1
    pad = k // 2
    conv = lambda x, w: conv2d(
        x, w, strides=(stride, stride), padding=((pad, pad), (pad, pad)), groups=groups, impl=impl
    )
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


def torch_step(layout, batch, shape, dtype, grad, device="cpu"):
    """torch's conv forward (or forward+backward) as a zero-arg callable (which waits for the GPU on 'cuda')."""
    import torch
    import torch.nn.functional as F

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    _, size, cin, cout, k, stride, groups = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen).to(device, tdtype).contiguous(memory_format=memory_format)
    w = (
        (0.1 * torch.randn(cout, cin // groups, k, k, generator=gen))
        .to(device, tdtype)
        .contiguous(memory_format=memory_format)
    )
    conv = lambda: F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if not grad:

        def step():
            with torch.no_grad():
                conv()
            sync()

        return step
    x.requires_grad_(True)
    w.requires_grad_(True)
    ct = torch.randn(conv().shape, generator=gen).to(device, tdtype).contiguous(memory_format=memory_format)

    def step():
        x.grad = w.grad = None
        conv().backward(ct)
        sync()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="xla,split,chunked,blockdiag")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shape-set", choices=tuple(SHAPE_SETS), default="grouped")
    parser.add_argument("--shapes", default="", help="substrings of shape names to keep")
    parser.add_argument("--no-xla-grad", action="store_true", help="skip the VJP of 'xla' (seconds per call on CPU)")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    shapes = [
        s for s in SHAPE_SETS[args.shape_set] if not args.shapes or any(k in s[0] for k in args.shapes.split(","))
    ]
    torch_on = None
    if not args.no_torch:
        import torch

        from resnext_jax.benchmarks.torch_step import torch_device

        torch.set_num_threads(args.threads)
        torch_on = torch_device(jax.default_backend())
        torch.backends.cudnn.benchmark = True
    print(f"# python -m resnext_jax.benchmarks.conv {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} cpus, jax {jax.__version__} "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), torch on {torch_on}, batch {args.batch}, "
        f"median of {args.reps}, {args.shape_set} shapes"
    )
    print(
        "| shape | dtype | pass | " + " | ".join(impls + ([] if args.no_torch else ["torch NCHW", "torch NHWC"])) + " |"
    )
    print("|---" * (3 + len(impls) + (0 if args.no_torch else 2)) + "|")
    for shape in shapes:
        for dtype in args.dtypes.split(","):
            for grad in (False, True):
                labels, steps, compiles = [], [], {}
                for impl in impls:
                    if grad and impl == "xla" and args.no_xla_grad:
                        continue
                    step, compiles[impl] = jax_step(impl, args.batch, shape, getattr(jnp, dtype), grad)
                    labels.append(impl)
                    steps.append(step)
                if not args.no_torch:
                    for layout in ("nchw", "channels_last"):
                        labels.append(layout)
                        steps.append(torch_step(layout, args.batch, shape, dtype, grad, torch_on))
                ms = dict(zip(labels, _time_interleaved(steps, args.reps)))
                cells = [f"{ms[i]:.1f} ({compiles[i]:.1f}s)" if i in ms else "skip" for i in impls]
                if not args.no_torch:
                    cells += [f"{ms['nchw']:.1f}", f"{ms['channels_last']:.1f}"]
                print(
                    f"| {shape[0]} | {dtype} | {'fwd+vjp' if grad else 'fwd'} | " + " | ".join(cells) + " |", flush=True
                )
    print("# cells: median ms (jit compile s); torch cells: median ms")


if __name__ == "__main__":
    main()
