"""The cost of a checkpoint's checksums (`resnext_jax.training.checkpoint.checksums`) for one model's train state.

    python benchmarks/checksum.py --model resnext50_32x4d

Each save computes a CRC-32 of every array of the train state (params, batch statistics, AdamW's two moments) and of
the data-iterator state; each restore computes them again to verify. Prints the median of `--runs` timings.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import resnext_jax
from resnext_jax.models.init import init_variables
from resnext_jax.training.checkpoint import checksums
from resnext_jax.training.config import default_config
from resnext_jax.training.optim import create_learning_rate_schedule, create_optimizer
from resnext_jax.training.step import create_train_state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    config = default_config()
    model = resnext_jax.create_model(args.model, dtype=jnp.float32)
    variables = init_variables(model, jax.random.key(0), 224)
    tx = create_optimizer(config, create_learning_rate_schedule(config, 100), variables["params"])
    state = jax.block_until_ready(create_train_state(tx, variables, jax.random.PRNGKey(1), False))
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    iterator_state = {"last_seen_indices": {"0": 123456}, "worker_count": 0}
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        checksums(state, iterator_state)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"{args.model}: train state {size / 2**20:.0f} MiB, checksums {median * 1e3:.0f} ms per save "
        f"(median of {args.runs}; {size / 2**30 / median:.2f} GiB/s)"
    )


if __name__ == "__main__":
    main()
