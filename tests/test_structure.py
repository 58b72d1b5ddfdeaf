"""The package's layering: models -> ops -> cpu (the native kernels), never the other way, and models free of
backend details; no library file far over 400 lines."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resnext_jax")


def _imports(path: str) -> set[str]:
    """Every module name `path` imports (absolute, `resnext_jax...` for relative imports of the package)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(folder: str) -> list[str]:
    root = os.path.join(PACKAGE, folder)
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))


# folder -> package prefixes it must not import
FORBIDDEN = {
    "models": ("resnext_jax.cpu", "resnext_jax.training", "resnext_jax.inference", "resnext_jax.benchmarks"),
    "ops": ("resnext_jax.models", "resnext_jax.training", "resnext_jax.inference"),
    "cpu": ("resnext_jax.ops", "resnext_jax.models", "resnext_jax.training", "resnext_jax.inference"),
}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_run_one_way(folder):
    bad = {
        os.path.relpath(path, PACKAGE): sorted(n for n in _imports(path) if n.startswith(FORBIDDEN[folder]))
        for path in _files(folder)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_models_read_no_backend():
    """The platform is passed in: models never call jax.default_backend() or jax.devices() (the top-level
    `Network.layers` and the layers' own defaults, for standalone use, excepted)."""
    allowed = {"network.py": 1, "layers.py": 1, "norms.py": 1}
    for path in _files("models"):
        with open(path) as f:
            count = f.read().count("jax.default_backend()")
        assert count <= allowed.get(os.path.basename(path), 0), path


def test_no_library_file_far_over_400_lines():
    sizes = {}
    for path in _files(""):
        with open(path) as f:
            sizes[os.path.relpath(path, PACKAGE)] = sum(1 for _ in f)
    assert not {k: v for k, v in sizes.items() if v > 420}
