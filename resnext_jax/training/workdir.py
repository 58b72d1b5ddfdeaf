"""The workdir's run records: the resolved config, package versions and devices, and the incompatible-run guard."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform

import jax

from resnext_jax.training.config import ConfigError, config_differences

_PACKAGES = ("resnext-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
             "ml-collections", "tensorflow-datasets")


def check_compatible(workdir: str, config_dict: dict) -> bool:
    """Raises ConfigError if `workdir` holds a run whose config differs (outside the resumable fields).

    Returns True when an earlier run of the same config is there (so this run resumes it).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        saved = json.load(f)
    diffs = config_differences(saved, config_dict)
    if diffs:
        raise ConfigError(
            f"{workdir} holds a run with a different config, which this run would overwrite:\n  "
            + "\n  ".join(diffs)
            + f"\nUse a new --workdir for the new config, or rerun with the saved config ({path}) to resume it.")
    return True


def write_run_records(workdir: str, config_dict: dict) -> None:
    """Writes `config.json` (the resolved config) and `environment.json` (versions, devices, time)."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    environment = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
    }
    with open(os.path.join(workdir, "environment.json"), "w") as f:
        json.dump(environment, f, indent=2)
