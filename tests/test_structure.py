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


# ---------------------------------------------------------------------------------------------- one layer per concern


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def _package_of(module: str, path: str) -> str:
    """The package a module belongs to: itself for a package's __init__, else its parent."""
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]


MODULES = {_module_name(path): path for path in _files("")}


def test_inference_export_and_data_import_nothing_from_training():
    """What the trainer and inference share (the mesh, the run's file formats) lives outside training/."""
    bad = {}
    for folder in ("inference", "export", "data"):
        for path in _files(folder):
            names = sorted(n for n in _imports(path) if n.startswith("resnext_jax.training"))
            if names:
                bad[os.path.relpath(path, PACKAGE)] = names
    for path in (os.path.join(PACKAGE, "plot.py"), os.path.join(PACKAGE, "parallel.py")):
        names = sorted(n for n in _imports(path) if n.startswith("resnext_jax.training"))
        if names:
            bad[os.path.relpath(path, PACKAGE)] = names
    assert not bad


def _private_uses(path: str) -> list[tuple[str, str]]:
    """(module, name) for every private name `path` takes from another module of the package: imported by name, or
    read as an attribute of an imported module."""
    with open(path) as f:
        tree = ast.parse(f.read())
    aliases, uses = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("resnext_jax"):
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnext_jax"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    uses.append((node.module, alias.name))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            uses.append((aliases[node.value.id], node.attr))
    return uses


def test_no_private_name_crosses_a_package():
    bad = []
    for module, path in MODULES.items():
        home = _package_of(module, path)
        for source, name in _private_uses(path):
            source_home = _package_of(source, MODULES.get(source, ""))
            if source_home != home:
                bad.append(f"{module} uses {source}.{name}")
    assert not bad


def _module_level_imports(path: str) -> set[str]:
    """The package's modules `path` imports when it is imported (statements at module level, not in functions)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return {name for name in found if name in MODULES}


def test_no_import_cycles():
    """No module imports, at import time, a module that imports it back (through any chain): each layer can be read
    and tested on its own. A package's __init__ re-exporting its own modules does not count."""
    graph = {module: _module_level_imports(path) for module, path in MODULES.items()}
    for module, path in MODULES.items():
        if path.endswith("__init__.py"):  # re-exports of the package's own modules
            graph[module] = {name for name in graph[module] if not name.startswith(module + ".")}
    cycles, state = [], {}

    def visit(module, chain):
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                cycles.append(" -> ".join(chain[chain.index(name) :] + [name]))
            elif name not in state:
                visit(name, chain + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles
