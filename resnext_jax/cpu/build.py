"""Building and loading the native CPU kernels (`native/*.cc`), once per source, compiler and jaxlib.

The kernels are compiled with the system's C++ compiler (`$CXX`, else `g++`, `c++` or `clang++`) into
`$RESNEXT_JAX_CACHE` (default `~/.cache/resnext_jax`), then loaded and registered as XLA FFI targets. They
need an x86-64 CPU with AVX2 and FMA; with AVX-512F and AVX-512VL they are built for AVX-512 (16-lane vectors,
32 registers). `RESNEXT_JAX_NATIVE_ISA=avx2` builds the AVX2 variant on an AVX-512 CPU (to test it there), and
`RESNEXT_JAX_NATIVE=0` turns them off. The first build in a cache logs one line (compiler, instruction set,
seconds, library path); `python -m resnext_jax.cpu build` builds ahead of time.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time

import jax

NATIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
# Compiled together into one library; the headers are part of the build key.
SOURCES = tuple(
    os.path.join(NATIVE_DIR, name)
    for name in (
        "grouped_conv.cc",
        "epilogue.cc",
        "channel_sums.cc",
        "max_pool.cc",
        "few_channel_grad.cc",
        "few_channel_conv.cc",
        "matmul.cc",
    )
)
HEADERS = tuple(os.path.join(NATIVE_DIR, name) for name in ("parallel.h", "tail.h"))
TARGET = "resnext_jax_grouped_conv_forward"
GRAD_TARGET = "resnext_jax_grouped_conv_kernel_grad"
EPILOGUE_TARGET = "resnext_jax_affine_add_relu"
SUMS_TARGET = "resnext_jax_channel_sums"
POOL_GRAD_TARGET = "resnext_jax_max_pool_grad"
FEW_CHANNEL_GRAD_TARGET = "resnext_jax_few_channel_kernel_grad"
FEW_CHANNEL_CONV_TARGET = "resnext_jax_few_channel_conv"
MATMUL_TARGET = "resnext_jax_matmul_affine"
# FFI target -> symbol in the built library.
SYMBOLS = {
    TARGET: "ResnextJaxGroupedConvForward",
    GRAD_TARGET: "ResnextJaxGroupedConvKernelGrad",
    EPILOGUE_TARGET: "ResnextJaxAffineAddRelu",
    SUMS_TARGET: "ResnextJaxChannelSums",
    POOL_GRAD_TARGET: "ResnextJaxMaxPoolGrad",
    FEW_CHANNEL_GRAD_TARGET: "ResnextJaxFewChannelKernelGrad",
    FEW_CHANNEL_CONV_TARGET: "ResnextJaxFewChannelConv",
    MATMUL_TARGET: "ResnextJaxMatmulAffine",
}
OPT_OUT = "RESNEXT_JAX_NATIVE"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# Instruction set -> (the /proc/cpuinfo flags it needs, compiler flags). The kernels are written for both
# (`__AVX512F__` selects); the best the CPU has is built, or the one `RESNEXT_JAX_NATIVE_ISA` names.
ISAS = {
    "avx512": ({"avx512f", "avx512vl", "fma"}, ("-mavx512f", "-mavx512vl", "-mfma")),
    "avx2": ({"avx2", "fma"}, ("-mavx2", "-mfma")),
}
ISA_ENV = "RESNEXT_JAX_NATIVE_ISA"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable_isas(flags: set[str] | None = None) -> list[str]:
    """The instruction sets of `ISAS` this CPU runs, best first (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags() if flags is None else flags
    return [isa for isa, (needs, _) in ISAS.items() if needs <= flags]


def select_isa(environ=os.environ, flags: set[str] | None = None) -> tuple[str | None, str]:
    """(instruction set to build, or None; why): the best this CPU runs, or `$RESNEXT_JAX_NATIVE_ISA`."""
    flags = cpu_flags() if flags is None else flags
    runnable = runnable_isas(flags)
    wanted = environ.get(ISA_ENV, "")
    if wanted:
        if wanted not in ISAS:
            return None, f"{ISA_ENV}={wanted!r} is not one of {sorted(ISAS)}"
        if wanted not in runnable:
            missing = ", ".join(sorted(ISAS[wanted][0] - flags))
            return None, f"{ISA_ENV}={wanted}, but this CPU lacks {missing}; unset it to build the best it has"
        return wanted, f"{ISA_ENV}={wanted}"
    if not runnable:
        missing = ", ".join(sorted(ISAS["avx2"][0] - flags))
        return None, f"it needs a CPU with AVX2 and FMA ({missing} not in /proc/cpuinfo's flags)"
    return runnable[0], "the best this CPU has"


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else the first of g++, c++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "resnext_jax")
    return os.environ.get("RESNEXT_JAX_CACHE", default)


def _build(cxx: str, isa: str) -> str:
    """Compiles the kernels for `isa` unless a build of this source, compiler, instruction set and jaxlib
    exists; returns the .so path."""
    import jaxlib

    source = b""
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            source += f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    flags = FLAGS + ISAS[isa][1]
    key = hashlib.sha256(source + repr((version, flags, jaxlib.__version__)).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), f"grouped_conv-{isa}-{key}.so")
    if os.path.exists(target):
        BUILD["cached"] = True
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    started = time.perf_counter()
    # Build beside the target and rename: concurrent processes never load a half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    command = [cxx, *flags, f"-I{jax.ffi.include_dir()}", *SOURCES, "-o", partial]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        os.unlink(partial)
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
    seconds = time.perf_counter() - started
    BUILD.update(cached=False, seconds=round(seconds, 1))
    logging.getLogger("resnext_jax").warning(
        "built the native CPU kernels (%s, %s) in %.0f s into %s", os.path.basename(cxx), isa, seconds, target
    )
    return target


# What the build did: compiler, isa, library path, cached (found in the cache) or seconds (built now).
BUILD: dict = {}
# FFI target -> the name it is registered under in this process (filled by `_load`).
_REGISTERED: dict[str, str] = {}


@functools.cache
def _load() -> tuple[bool, str]:
    """(available, reason): builds and registers the kernel once per process."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False, f"{OPT_OUT}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"it needs an x86-64 CPU (this is {platform.machine()})"
    chosen, why = select_isa()
    if chosen is None:
        return False, why
    cxx = compiler()
    if cxx is None:
        return False, "no C++ compiler found: install g++ (or set CXX) to build it"
    BUILD.update(compiler=cxx, isa=chosen)
    try:
        path = _build(cxx, chosen)
        BUILD["library"] = path
        library = ctypes.cdll.LoadLibrary(path)
        # Registered under names unique to the build, so that two versions of this package can run in one
        # process (benchmarks/ab.py) without one calling the other's kernels.
        build = os.path.basename(path)[: -len(".so")].rsplit("-", 1)[-1]
        for target, symbol in SYMBOLS.items():
            _REGISTERED[target] = f"{target}_{build}"
            jax.ffi.register_ffi_target(
                _REGISTERED[target], jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
    except (OSError, RuntimeError, AttributeError) as e:
        return False, f"building or loading it failed: {e}"
    _ISA[0] = chosen
    return True, "built"


_ISA: list[str | None] = [None]


def isa() -> str | None:
    """The instruction set the loaded kernels were built for ('avx512' or 'avx2'), None where unavailable."""
    return _ISA[0] if available() else None


def _target(name: str) -> str:
    """The registered name of FFI target `name`, building the kernels first if need be."""
    if not available():
        raise RuntimeError(f"the native CPU kernels are unavailable: {unavailable_reason()}")
    return _REGISTERED[name]


def available() -> bool:
    """Whether the native kernels can run here (builds them on the first call)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None where they can)."""
    ok, reason = _load()
    return None if ok else reason
