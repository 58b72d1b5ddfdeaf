"""A dataset's identity: what a training run records about the data it trained on, to notice when it changes.

`prepare folder OTHER --name same_name --overwrite` replaces a dataset under the same name. A run that only kept the
name would then resume on the new labels, and `load_model` would print the new class names for the old model. The
identity is the name, the version directory, the class names, the split sizes, the normalization and a
fingerprint of the files: each file's name and size and a CRC-32 of its first and last 64 KiB (a dataset's
ArrayRecord footers index every record, so any rewrite changes them). Reading it costs a few reads per shard, not
a pass over the data. Training records it in `<workdir>/dataset.json` (`resnext_jax.training.workdir`); training
on resume and `load_model` compare it with the dataset on disk.
"""

from __future__ import annotations

import os
import zlib

from resnext_jax.data.datasets import dataset_directory, dataset_info, default_data_dir

_EDGE = 64 * 1024  # bytes read at each end of every file for the fingerprint


def fingerprint(directory: str) -> str:
    """A hex CRC-32 over every file of `directory` (sorted): its name, size, and first and last `_EDGE` bytes."""
    crc = 0
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        crc = zlib.crc32(f"{name}\0{size}\0".encode(), crc)
        with open(path, "rb") as f:
            crc = zlib.crc32(f.read(_EDGE), crc)
            if size > _EDGE:
                f.seek(max(_EDGE, size - _EDGE))
                crc = zlib.crc32(f.read(_EDGE), crc)
    return f"{crc:08x}"


def dataset_identity(name: str, data_dir: str | None = None) -> dict:
    """The identity of dataset `name` in `data_dir` as it is on disk now (a JSON-able dict; see the module doc).

    Raises what `dataset_info` raises for a dataset that is not prepared or cannot be read.
    """
    data_dir = data_dir or default_data_dir()
    info = dataset_info(name, data_dir)
    directory = dataset_directory(name, data_dir)
    return {
        "name": name,
        "version": os.path.basename(directory) if directory else None,
        "class_names": list(info.class_names) if info.class_names else None,
        "num_classes": info.num_classes,
        "splits": {info.train_split: info.num_train, info.eval_split: info.num_eval},
        "mean": [float(value) for value in info.mean],
        "std": [float(value) for value in info.std],
        "fingerprint": fingerprint(directory) if directory else None,
    }


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """What changed between two identities, as short 'what: before -> after' phrases ([] when the same)."""
    changes = []
    for key, what in (
        ("class_names", "classes"),
        ("num_classes", "class count"),
        ("splits", "split sizes"),
        ("mean", "mean"),
        ("std", "std"),
        ("version", "version"),
    ):
        if recorded.get(key) != current.get(key):
            changes.append(f"{what} {_short(recorded.get(key))} -> {_short(current.get(key))}")
    if not changes and recorded.get("fingerprint") != current.get("fingerprint"):
        changes.append(f"files rewritten (fingerprint {recorded.get('fingerprint')} -> {current.get('fingerprint')})")
    return changes


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:5]))}, ... ({len(value)} in all)]"
    return repr(value)
