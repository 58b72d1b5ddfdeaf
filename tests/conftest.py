"""Shared test setup.

Under pytest-xdist (the README's command runs two workers), a test marked `alone` runs with no other test beside
it: the multi-host runs and kill -9 tests, whose bounded waits assume the CPUs are theirs, timing comparisons, and the
largest models, which would not fit in memory twice. The workers take a file lock around each test (shared, or
exclusive for `alone`), through a turnstile so that an `alone` test is not starved. Session and module fixtures
are built once per worker that needs them.

A persistent JAX compilation cache: the suite compiles the same small models many times (in this process and in
the training runs it starts as subprocesses, which inherit the environment), and XLA's compile is most of a small
test's time on a CPU. The cache is keyed by the lowered program, the compile options and the jax version, so an
edited model simply misses; it lives in `<repo>/.cache/jax-compilation` (`RESNEXT_JAX_TEST_CACHE` overrides) and is
safe to delete at any time.
"""

import contextlib
import fcntl
import os
import tempfile
import time

import pytest  # imports no jax: the environment below is still set first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RESNEXT_JAX_TEST_CACHE") or os.path.join(ROOT, ".cache", "jax-compilation")

# Set before jax is imported anywhere, so that this process and every subprocess read the same values.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
# jax's default keeps only programs that took over a second to compile; most of ours take 0.1-1 s, many times over.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished training run shared by the tests that only read a run: `test_training.tiny_config` for two
    epochs with EMA (44 steps; evals and checkpoints at steps 22 and 44). Never write into it: copy it first
    (`shutil.copytree`) to change it."""
    from test_training import tiny_config

    from resnext_jax.training import train_and_evaluate

    path = tmp_path_factory.mktemp("tiny_run")
    train_and_evaluate(tiny_config(num_epochs=2, ema_decay=0.9), str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpointed_run(tmp_path_factory):
    """One finished one-epoch run of `test_training.tiny_config` with a checkpoint every 5 steps (22 steps; kept:
    15, 20 and 22), shared by the fault tests. Never write into it: copy it first."""
    from test_training import tiny_config

    from resnext_jax.training import train_and_evaluate

    path = tmp_path_factory.mktemp("tiny_checkpointed_run")
    train_and_evaluate(tiny_config(num_epochs=1, checkpoint_every_steps=5), str(path))
    return str(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around the whole protocol (setup, which may build a session fixture, call and teardown) of each test."""
    # Only in an xdist worker (not in a pytest that a test starts, which inherits the workers' environment).
    worker = getattr(item.config, "workerinput", None)
    if worker is None:
        yield
        return
    prefix = os.path.join(tempfile.gettempdir(), f"resnext-jax-tests-{worker['testrunuid']}")
    with _turn(prefix, item.get_closest_marker("alone") is not None):
        yield


@contextlib.contextmanager
def _turn(prefix: str, alone: bool, timeout_s: float = 1800):
    """An exclusive (`alone`) or shared hold of `<prefix>.lock`. A turnstile taken first stops new shared holders
    while an exclusive one waits. Closing the files releases both; a wait over `timeout_s` fails instead of
    hanging (the longest test takes about 4 minutes)."""
    with open(prefix + ".turnstile", "a") as turnstile, open(prefix + ".lock", "a") as lock:
        deadline = time.monotonic() + timeout_s
        _flock(turnstile, fcntl.LOCK_EX, deadline)
        _flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH, deadline)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


def _flock(file, mode: int, deadline: float) -> None:
    while True:
        try:
            fcntl.flock(file, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited too long for the test lock {file.name}; is another test hanging?") from None
            time.sleep(0.05)
