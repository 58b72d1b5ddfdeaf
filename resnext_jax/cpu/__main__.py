"""`python -m resnext_jax.cpu build|info`: build the native CPU kernels now, or say what this machine has."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from resnext_jax import cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.cpu", description=__doc__)
    parser.add_argument(
        "command",
        choices=("build", "info"),
        help="build: compile (or find) the kernels; info: the CPU, compiler, cache and kernels",
    )
    parser.add_argument("--json", action="store_true", help="print the state as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok = cpu.available()  # builds on the first call in a cache
    state = cpu.report()
    state.update(cpu_isas=cpu.runnable_isas(), compiler=cpu.compiler(), cache=cpu.cache_dir())
    if args.json:
        print(json.dumps(state, indent=2))
    elif ok:
        build = state["build"]
        how = "found in the cache" if build.get("cached") else f"built in {build.get('seconds')} s"
        print(f"native CPU kernels: available, {state['isa']} build {how}: {build.get('library')}")
        print(f"compiler {build.get('compiler')}; this CPU runs {', '.join(state['cpu_isas'])}")
        for name, (what, fallback) in cpu.KERNELS.items():
            print(f"  {name:25s} {what} (elsewhere: {fallback})")
    else:
        print(
            f"native CPU kernels: unavailable: {state['unavailable_reason']}. The models run the pure-XLA "
            f"implementations instead (same results, slower on CPU)."
        )
    return 0 if ok or args.command == "info" else 1


if __name__ == "__main__":
    sys.exit(main())
