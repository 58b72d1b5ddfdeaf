"""Host memory for XLA:CPU: let glibc's malloc back large buffers with transparent huge pages.

XLA:CPU allocates an executable's whole temporary buffer with `posix_memalign` on every call (1.3 GiB for
a ResNeXt-50 train step at batch 8). glibc serves an allocation that large with a fresh `mmap` and unmaps
it on free, so every step faults in all of its 4 KiB pages again: ~370 000 page faults and ~0.5 s of
kernel time per step on the 2-core CPU, charged to whichever op first writes each buffer.
With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages on its mappings
(`madvise(MADV_HUGEPAGE)`), the same buffer faults in 2 MiB at a time, and the step runs 1.67 -> 1.44 s
(docs/benchmarks-history.md, "Host memory"). Keeping the pages mapped instead (`glibc.malloc.mmap_max=0` with one
arena) removes the faults too, but measured slower: 1.75-2.24 s.

glibc reads tunables only when a process starts, so the command-line entry points (`python -m train`,
`python -m resnext_jax.benchmarks.step`) call `reexec_with_huge_pages()` first: when the machine would benefit,
it re-executes the same command once with the tunable added to `GLIBC_TUNABLES`. Set
`RESNEXT_JAX_HUGEPAGES=0` to turn that off; library users can export the tunable themselves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "RESNEXT_JAX_HUGEPAGES"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """The running glibc's (major, minor), or None for another C library or OS."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None when unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_page_env(environ: Mapping[str, str], libc: tuple[int, int] | None, mode: str | None) -> dict | None:
    """The environment to re-execute with, or None when nothing would change.

    Needs glibc >= 2.35 (the first with `glibc.malloc.hugetlb`) and the kernel's `madvise` mode: under
    `always` every mapping already gets huge pages, under `never` none can. Also None when the tunable
    is already set (which stops a second re-exec) or `RESNEXT_JAX_HUGEPAGES=0`.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        environ.get(OPT_OUT, "1") == "0"
        or libc is None
        or libc < (2, 35)
        or mode != "madvise"
        or "glibc.malloc.hugetlb" in tunables
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(part for part in (tunables, TUNABLE) if part)}


def huge_pages_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process started with malloc's transparent huge pages on (for benchmark reports)."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def reexec_with_huge_pages(log: Callable[[str], None] | None = _to_stderr) -> None:
    """Re-executes the current command with `GLIBC_TUNABLES` += `glibc.malloc.hugetlb=1` when useful.

    Call it first thing in a `__main__`, before any work: the process image is replaced (same PID, same
    arguments), after one line to `log` (stderr by default; None for silence). Returns without doing
    anything when `huge_page_env` says so.
    """
    env = huge_page_env(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    if log is not None:
        log(
            f"restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for XLA's per-step buffers; "
            f"{OPT_OUT}=0 turns this off)"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
