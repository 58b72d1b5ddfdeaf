"""Shared test setup.

A persistent JAX compilation cache: the suite compiles the same small models many times (in this process and in
the training runs it starts as subprocesses, which inherit the environment), and XLA's compile is most of a small
test's time on a CPU. The cache is keyed by the lowered program, the compile options and the jax version, so an
edited model simply misses; it lives in `<repo>/.cache/jax-compilation` (`RESNEXT_JAX_TEST_CACHE` overrides) and is
safe to delete at any time.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RESNEXT_JAX_TEST_CACHE") or os.path.join(ROOT, ".cache", "jax-compilation")

# Set before jax is imported anywhere, so that this process and every subprocess read the same values.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
# jax's default keeps only programs that took over a second to compile; most of ours take 0.1-1 s, many times over.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
