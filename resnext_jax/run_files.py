"""The files of a training workdir that the trainer writes and inference reads, in one place both import: the
metrics records (`metrics.jsonl`), which step is the best, Orbax's per-step metadata, and the package versions that
records and reports carry.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl`, in order. A line that is not a whole JSON record (the torn last line
    a crash or a full disk can leave) is dropped with a warning."""
    path = os.path.join(workdir, "metrics.jsonl")
    records = []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "step" not in record or "split" not in record:
                    raise ValueError("not a metrics record")
            except ValueError:
                logging.warning("%s line %d is not a whole record (%r...); dropping it", path, number, line[:60])
                continue
            records.append(record)
    return records


def best_eval(records: list[dict], steps: list[int] | None = None) -> tuple[float, int] | None:
    """(top-1, step) of the best `eval` record, among `steps` (the kept checkpoints) when given, the earliest on a
    tie, as `load_model(which="best")` picks it; None without any eval record."""
    best = None
    for record in records:
        if record.get("split") != "eval" or "top1" not in record or (steps is not None and record["step"] not in steps):
            continue
        if best is None or record["top1"] > best[0]:
            best = (record["top1"], record["step"])
    return best


def lists_item(step_dir: str, item: str) -> bool:
    """Whether Orbax's step metadata names `item`: the step was written with it, so its absence is damage (a
    step written before that item existed does not name it)."""
    try:
        with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
            return item in (json.load(f).get("item_handlers") or {})
    except (OSError, ValueError, AttributeError):
        return False


PACKAGES = (
    "resnext-jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "numpy",
    "ml-collections",
    "pillow",
    "tensorflow-datasets",
    "torch",
    "torchvision",
)


def package_versions() -> dict[str, str | None]:
    """`{package: installed version or None}` for `PACKAGES`: the versions a run's records and reports carry."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
