"""How fast could this step get? The model's step against the same step with free grouped convs, and
against its dense convolutions timed one by one, all beside torchvision's step in the same process.

    python benchmarks/floor.py [--model resnext50_32x4d] [--mode infer|train] [--rounds 4]

Prints, as medians over interleaved blocks (`resnext_jax.benchmarks.timing.time_in_blocks`):
- `model`: the step as `python -m resnext_jax.benchmarks.step` times it;
- `free grouped convs`: the same step with every grouped convolution replaced by a strided slice of its
  input times the kernel's mean (same output shape, almost no work; train mode differentiates that
  stand-in), i.e. what the step would cost if grouped convolutions were free;
- `dense convs alone`: the sum, over the model's dense (ungrouped) convolutions, of each one's forward
  (train: forward and VJP) jitted and timed in isolation at the model's shapes, with the implementation
  `auto` picks for it. On CPU the 1x1 convs are single matmuls, so this is close to the step's matmul
  floor: what no rewrite of the rest of the step can remove;
- torchvision's step, and every row as a ratio against it.
The numbers in docs/benchmarks-history.md ("How far the CPU targets are") come from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/floor.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--mode", choices=("train", "infer"), default="infer")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--runs", type=int, default=5, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="blocks per variant, taking turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--no-torch", action="store_true")
    return parser.parse_args(argv)


def free_grouped(layers):
    """Context manager: grouped convs in `resnext_jax.models.layers` become a strided slice x kernel mean."""
    import contextlib

    import jax

    real_conv, real_canonical = layers.conv2d, layers.conv2d_canonical_grad

    def stand_in(x, kernel, strides, padding, groups):
        out = jax.eval_shape(
            lambda a, k: real_conv(a, k, strides=strides, padding=padding, groups=groups, impl="xla"), x, kernel
        )
        n, ho, wo, o = out.shape
        if o != x.shape[-1]:
            raise ValueError(f"free grouped conv needs as many output as input channels, got {x.shape} -> {o}")
        return x[:, :: strides[0], :: strides[1]][:, :ho, :wo] * kernel.mean()

    def conv(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), groups=1, **kwargs):
        if groups == 1:
            return real_conv(x, kernel, strides=strides, padding=padding, groups=groups, **kwargs)
        return stand_in(x, kernel, tuple(strides), padding, groups)

    def canonical(x, kernel, strides, padding, groups, impl, platform="cpu"):
        if groups == 1:
            return real_canonical(x, kernel, strides, padding, groups, impl, platform)
        return stand_in(x, kernel, tuple(strides), padding, groups)

    @contextlib.contextmanager
    def patched():
        layers.conv2d, layers.conv2d_canonical_grad = conv, canonical
        try:
            yield
        finally:
            layers.conv2d, layers.conv2d_canonical_grad = real_conv, real_canonical

    return patched()


def dense_convs(layers, model, batch: int, resolution: int) -> list[tuple]:
    """`(x shape, kernel shape, strides, padding)` of every dense conv the model's forward runs. Recorded with
    `conv_impl='xla'`, under which every conv is a `conv2d` or (on CPU) `conv2d_canonical_grad` call: with 'auto',
    inference on an AVX2 CPU hands the 1x1 convs with their batch norms to `cpu.matmul_affine` instead."""
    import jax
    import jax.numpy as jnp

    from resnext_jax.models.init import variable_shapes

    model = model.clone(conv_impl="xla")

    seen = []
    real_conv, real_canonical = layers.conv2d, layers.conv2d_canonical_grad

    def note(x, kernel, strides, padding, groups):
        if groups == 1:
            seen.append((tuple(x.shape), tuple(kernel.shape), tuple(strides), tuple(map(tuple, padding))))

    def record(x, kernel, *, strides=(1, 1), padding=((0, 0), (0, 0)), groups=1, **kwargs):
        note(x, kernel, strides, padding, groups)
        return real_conv(x, kernel, strides=strides, padding=padding, groups=groups, **kwargs)

    def record_canonical(x, kernel, strides, padding, groups, *args):
        note(x, kernel, strides, padding, groups)
        return real_canonical(x, kernel, strides, padding, groups, *args)

    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
    variables = variable_shapes(model, resolution)
    layers.conv2d, layers.conv2d_canonical_grad = record, record_canonical
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    finally:
        layers.conv2d, layers.conv2d_canonical_grad = real_conv, real_canonical
    return seen


def time_dense_convs(convs, mode: str, runs: int) -> float:
    """Seconds: the sum of each dense conv's median time alone (train: forward + VJP)."""
    import time

    import jax
    import jax.numpy as jnp

    from resnext_jax.ops import conv2d

    total = 0.0
    cache = {}
    for x_shape, k_shape, strides, padding in convs:
        key = (x_shape, k_shape, strides, padding)
        if key not in cache:
            x = jax.random.normal(jax.random.key(1), x_shape)
            k = jax.random.normal(jax.random.key(2), k_shape) * 0.05

            def fwd(x, k):
                return conv2d(x, k, strides=strides, padding=padding)

            if mode == "train":

                def fn(x, k):
                    y, vjp = jax.vjp(fwd, x, k)
                    return vjp(jnp.ones_like(y))
            else:
                fn = fwd
            call = jax.jit(fn)
            jax.block_until_ready(call(x, k))
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                jax.block_until_ready(call(x, k))
                times.append(time.perf_counter() - start)
            cache[key] = statistics.median(times)
        total += cache[key]
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from resnext_jax.benchmarks.jax_step import make_jax_step
    from resnext_jax.benchmarks.timing import compile_step, jax_callable, time_in_blocks
    from resnext_jax.benchmarks.torch_step import make_torch_step
    from resnext_jax.models import layers
    from resnext_jax.models.registry import create_model

    model = create_model(args.model)
    steps = {}
    step, state, inputs = make_jax_step(model, args.mode, args.batch, args.resolution)
    steps["model"] = jax_callable(compile_step(step, state, inputs)[0], state, inputs, args.mode)
    with free_grouped(layers):
        step, state, inputs = make_jax_step(model, args.mode, args.batch, args.resolution)
        steps["free grouped convs"] = jax_callable(compile_step(step, state, inputs)[0], state, inputs, args.mode)
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        steps["torchvision"] = make_torch_step(
            args.model, args.mode, args.batch, args.resolution, "float32", False, "adamw"
        )
    timings = time_in_blocks(steps, args.runs, args.warmup, args.rounds)
    convs = dense_convs(layers, model, args.batch, args.resolution)
    rows = {key: t["median_s"] for key, t in timings.items()}
    rows["dense convs alone"] = time_dense_convs(convs, args.mode, args.runs * args.rounds)
    torch_s = rows.get("torchvision")
    print(f"# python benchmarks/floor.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"{args.model} {args.mode} batch {args.batch} {args.resolution}px float32, {jax.devices()[0].platform}; "
        f"medians of {args.rounds} x {args.runs} steps; {len(convs)} dense convs"
    )
    for key, seconds in rows.items():
        ratio = f"  torch / this = {torch_s / seconds:.2f}x" if torch_s and key != "torchvision" else ""
        print(f"  {key:>20}: {seconds * 1e3:8.1f} ms{ratio}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from resnext_jax.ops.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
