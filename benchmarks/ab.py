"""A/B timing of one model step at two revisions of `resnext_jax`, in one process.

    python benchmarks/ab.py REV_A REV_B [--model resnext50_32x4d] [--mode train|infer] [--rounds 6]

Each REV is a git revision (`HEAD~1`, a hash, a branch) or `.` for the working tree as it is. Both steps
are compiled first, then timed taking turns in blocks (`resnext_jax.benchmarks.timing.time_in_blocks`: per
round, each gets `--warmup` untimed and `--runs` timed calls). On the noisy development machines only such
same-process, interleaved comparisons can resolve changes of a few percent; docs/benchmarks.md quotes them as
"A/B".

A revision's package is exported with `git archive` into a temporary directory and imported from there
(every `resnext_jax` module is dropped from `sys.modules` in between), so both versions live in the same
process. The step itself (loss, optimizer, inputs) is the current working tree's `resnext_jax.benchmarks`
harness, imported before any revision; only the model code and the compiler options come from the revision,
so any revision with `resnext_jax.models.registry.create_model` can be timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/ab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs=2, metavar="REV", help="git revisions, or '.' for the working tree")
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each block")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per revision, taking turns")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def export(rev: str, into: str) -> str:
    """Returns a directory whose `resnext_jax/` is the package at `rev` ('.': the working tree)."""
    if rev == ".":
        return ROOT
    try:
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", rev, "resnext_jax"], check=True, capture_output=True
        ).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(
            f"git archive {rev} failed: {e.stderr.decode().strip()}; give a revision that "
            f"`git -C {ROOT} rev-parse {rev}` knows, or '.' for the working tree"
        ) from None
    target = os.path.join(into, rev.replace("/", "_"))
    os.makedirs(target)
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target


def import_package(path: str):
    """Imports `resnext_jax` from `path`, dropping any already imported version first."""
    for name in [n for n in sys.modules if n == "resnext_jax" or n.startswith("resnext_jax.")]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        import resnext_jax.models.registry as registry
    finally:
        sys.path.remove(path)
    return registry


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    # The harness: the working tree's step, timing and compile helpers, bound before any revision is imported.
    from resnext_jax.benchmarks.jax_step import make_jax_step
    from resnext_jax.benchmarks.timing import compile_step, jax_callable, time_in_blocks

    sys.path.remove(ROOT)
    steps, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rev in args.revs:
            label = rev if rev not in steps else f"{rev} (2)"
            registry = import_package(export(rev, tmp))
            model = registry.create_model(args.model, conv_impl=args.conv_impl)
            step, state, inputs = make_jax_step(model, args.mode, args.batch, args.resolution)
            compiled, compile_s[label], _ = compile_step(step, state, inputs)
            steps[label] = jax_callable(compiled, state, inputs, args.mode)
            print(f"{label}: compiled in {compile_s[label]:.1f} s", flush=True)
    timings = time_in_blocks(steps, args.runs, args.warmup, args.rounds)
    (a, ta), (b, tb) = timings.items()
    print(
        f"{args.model} {args.mode} batch {args.batch} {args.resolution}px conv={args.conv_impl}: "
        f"{args.rounds} rounds x {args.runs} timed steps each"
    )
    for label, t in timings.items():
        per_round = [
            statistics.median(t["all_s"][i : i + args.runs]) * 1e3 for i in range(0, len(t["all_s"]), args.runs)
        ]
        print(
            f"  {label:>12}: median {t['median_s'] * 1e3:7.1f} ms (min {min(t['all_s']) * 1e3:.1f}, "
            f"max {max(t['all_s']) * 1e3:.1f}); round medians {' '.join(f'{m:.0f}' for m in per_round)}; "
            f"compile {compile_s[label]:.1f} s"
        )
    print(f"  {b} / {a}: {tb['median_s'] / ta['median_s']:.3f}x the step time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "compile_s": compile_s, "timings": timings}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from resnext_jax.ops.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
