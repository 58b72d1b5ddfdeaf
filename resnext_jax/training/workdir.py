"""The workdir's run records (the resolved config, package versions and devices), the incompatible-run guard,
the record of resumed-with-changes runs, and the one-writer lock."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import socket

import jax

from resnext_jax.run_files import best_eval, package_versions, read_metrics
from resnext_jax.training.config import CHANGEABLE_FIELDS, ConfigError, config_differences


def check_compatible(workdir: str, config_dict: dict, allow_changes: bool = False) -> dict[str, tuple]:
    """Raises ConfigError if `workdir` holds a run whose config differs (outside the resumable fields).

    With `allow_changes`, differences in `CHANGEABLE_FIELDS` (learning rate, schedule, clipping, regularization)
    are allowed and returned as `{field: (saved, new)}`, for `record_changes`; any other difference is still
    refused. Returns {} for a new workdir or an identical config.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} cannot be read ({error}); restore it, or use a new --workdir") from None
    diffs = config_differences(saved, config_dict)
    changes = {
        key: (saved.get(key), config_dict.get(key))
        for key in CHANGEABLE_FIELDS
        if saved.get(key) != config_dict.get(key)
    }
    clip = changes.get("grad_clip_norm")
    if allow_changes and clip and (not clip[0]) != (not clip[1]):
        raise ConfigError(
            f"config.grad_clip_norm cannot switch between 0 (off) and on when resuming ({clip[0]} -> "
            f"{clip[1]}): that changes the optimizer state. Keep it {'off' if not clip[0] else 'on'}, "
            f"or start a new --workdir."
        )
    refused = [line for line in diffs if not (allow_changes and line.split(":", 1)[0] in changes)]
    if refused:
        hint = ""
        if not allow_changes and all(line.split(":", 1)[0] in CHANGEABLE_FIELDS for line in refused):
            hint = (
                "\nThese fields may change on resume: rerun with --allow_changes to continue this run with "
                "them (the change is recorded in config_changes.jsonl)."
            )
        raise ConfigError(
            f"{workdir} holds a run with a different config, which this run would overwrite:\n  "
            + "\n  ".join(refused)
            + f"\nUse a new --workdir for the new config, or rerun with the saved config ({path}) to resume it."
            + hint
        )
    return changes if allow_changes else {}


def record_changes(workdir: str, step: int, changes: dict[str, tuple]) -> None:
    """Appends `{time, step, changes}` to `<workdir>/config_changes.jsonl`: what a resumed run changed, and where."""
    if not changes:
        return
    record = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "step": int(step),
        "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()},
    }
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class WorkdirLock:
    """One writer per workdir: an exclusive `flock` on `<workdir>/LOCK`, which holds the holder's pid, host and
    start time for the message a second run gets.

    The kernel releases a flock when its process dies (kill -9 included), so a lock left by a dead run on this
    machine is stale by construction and is simply taken over. The workdir directory itself is flocked too, so
    that `rm LOCK` under a live run does not let a second run in beside it. Taken by process 0 only.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "LOCK")
        self._file = None
        self._directory = None  # the flocked descriptor of the workdir itself

    def acquire(self) -> None:
        try:
            self._directory = os.open(os.path.dirname(self.path), os.O_RDONLY)
            fcntl.flock(self._directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._directory)
            self._directory = None
            self._refuse(None)
        except OSError:  # a file system without flock on directories: the LOCK file's lock still holds
            if self._directory is not None:
                os.close(self._directory)
            self._directory = None
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            self._refuse(f)
        f.seek(0)
        f.truncate()
        json.dump(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
            },
            f,
        )
        f.flush()
        self._file = f

    def _refuse(self, f) -> None:
        """Raises the one-line error naming the holder (from LOCK; 'its LOCK file was removed' when it is gone)."""
        holder = {}
        try:
            if f is None:
                f = open(self.path)
            f.seek(0)
            holder = json.loads(f.read() or "{}")
        except (OSError, json.JSONDecodeError):
            pass
        finally:
            if f is not None:
                f.close()
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            if holder
            else "another process" + ("" if os.path.exists(self.path) else "; its LOCK file was removed")
        )
        raise ConfigError(
            f"{os.path.dirname(self.path)} is in use by another run ({who}). Wait for it to "
            f"finish or stop it (Ctrl-C saves and exits), or use another --workdir."
        ) from None

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._directory is not None:
            fcntl.flock(self._directory, fcntl.LOCK_UN)
            os.close(self._directory)
            self._directory = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def write_run_records(workdir: str, config_dict: dict) -> None:
    """Writes `config.json` (the resolved config) and `environment.json` (versions, devices, time)."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    versions = package_versions()
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


def record_native_kernels(workdir: str) -> None:
    """Adds `native_kernels` to `environment.json` (`resnext_jax.cpu.report()`: available or why not, the build,
    the kernels the traced train step uses and why each other one is not), once the first step is traced."""
    from resnext_jax import cpu

    path = os.path.join(workdir, "environment.json")
    with open(path) as f:
        environment = json.load(f)
    environment["native_kernels"] = cpu.report()
    with open(path + ".tmp", "w") as f:
        json.dump(environment, f, indent=2)
    os.replace(path + ".tmp", path)


def remove_if_unstarted(workdir: str, created: bool) -> None:
    """After a failed start (no config.json was written), removes the LOCK file, and the workdir itself if this
    run created it and nothing else is in it, so that a typo leaves no `runs/NAME/LOCK` behind."""
    try:
        if os.path.exists(os.path.join(workdir, "config.json")) or os.listdir(workdir) != ["LOCK"]:
            return
        os.remove(os.path.join(workdir, "LOCK"))
        if created:
            os.rmdir(workdir)
    except OSError:
        pass  # another process took the directory meanwhile: it is theirs now


def best_kept(workdir: str, steps: list[int]) -> tuple[float | None, int | None]:
    """(top-1, step) of the best eval among the kept checkpoint `steps`: the step `load_model(which="best")`
    loads; (None, None) when no kept step was evaluated."""
    path = os.path.join(workdir, "metrics.jsonl")
    best = best_eval(read_metrics(workdir), steps) if os.path.exists(path) else None
    return best if best is not None else (None, None)


DATASET_FILE = "dataset.json"


def check_dataset(workdir: str, name: str, data_dir: str | None, allow_changes: bool) -> tuple[dict, dict]:
    """Compares the dataset on disk with the one `<workdir>/dataset.json` recorded when the run started.

    Returns (the identity now, {"dataset": (recorded, now)} when it changed and `allow_changes`, else {}), for
    `record_dataset` and `record_changes`. Raises ConfigError when it changed (other classes, split sizes,
    normalization or files), unless `allow_changes`: resuming would train the saved model on other labels.
    """
    from resnext_jax.data.identity import dataset_identity, identity_differences

    current = dataset_identity(name, data_dir)
    recorded = read_dataset_record(workdir)
    if recorded is None:
        return current, {}
    differences = identity_differences(recorded, current)
    if not differences:
        return current, {}
    if recorded.get("num_classes") != current["num_classes"]:  # the saved head cannot take the new labels
        raise ConfigError(
            f"dataset {name!r} changed since {workdir} started training on it ({'; '.join(differences)}); its "
            f"model has {recorded.get('num_classes')} outputs, so no run can continue on the new data, even with "
            f"--allow_changes. Restore the dataset it trained on, or train in a new --workdir "
            f"(--config.init_from={workdir} fine-tunes this run's backbone)"
        )
    if not allow_changes:
        raise ConfigError(
            f"dataset {name!r} changed since {workdir} started training on it ({'; '.join(differences)}). "
            f"Restore the dataset it trained on, use a new --workdir, or rerun with --allow_changes to continue "
            f"on the new data (recorded in config_changes.jsonl)"
        )
    return current, {"dataset": ({k: recorded.get(k) for k in _SUMMARY}, {k: current.get(k) for k in _SUMMARY})}


_SUMMARY = ("class_names", "splits", "fingerprint")


def read_dataset_record(workdir: str) -> dict | None:
    """`<workdir>/dataset.json` (the identity of the data the run trained on), or None for a run without one."""
    path = os.path.join(workdir, DATASET_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path} cannot be read ({error}); restore it, or delete it to record the data anew"
        ) from None


def record_dataset(workdir: str, identity: dict) -> None:
    """Writes `identity` as `<workdir>/dataset.json`; a different earlier record (a change allowed with
    `--allow_changes`) is kept beside it as `dataset.json.<time>`."""
    path = os.path.join(workdir, DATASET_FILE)
    previous = read_dataset_record(workdir)
    if previous == identity:
        return
    if previous is not None:
        os.replace(path, f"{path}.{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}")
    with open(path + ".tmp", "w") as f:
        json.dump(identity, f, indent=2)
    os.replace(path + ".tmp", path)
