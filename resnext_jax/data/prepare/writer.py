"""Writes an image-classification dataset in TFDS's ArrayRecord layout, atomically and without TensorFlow.

The result is what `tfds` itself writes (`dataset_info.json`, `features.json`, `label.labels.txt` and
`<name>-<split>.array_record-000NN-of-000MM`), so `tfds.builder_from_directory` and `tfds.data_source` read it
like any other dataset. Examples are serialized as tf.train.Example protos by TFDS's own feature connectors, whose
protobuf copy needs no TensorFlow.

Why the two passes: the loaders give each process a contiguous block of records, so a split must not be stored in
class order (one process would see only the first classes). TFDS stores records sorted by an md5 hash of their key
salted with the split name; we do the same. Sources that arrive in class order (tar archives) are first streamed
into one staging file, then copied in hash order, so memory holds two numbers per example, never the images.

Why the temporary directory: everything is written under `<name>/.incomplete-<version>-<pid>` beside the target
and renamed into place at the very end. An interrupted or failed run leaves no version directory, hence nothing
that loads; a full disk removes the partial output and says so.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import math
import os
import re
import shutil
import time

import numpy as np

from resnext_jax.errors import UserError, disk_error

# TFDS keeps shards under 1 GiB; readers open one file per shard, so fewer, larger files are cheaper.
MAX_SHARD_BYTES = 2**30
# One record per chunk (random access), as TFDS writes, but uncompressed: TFDS's default zstd cannot shrink JPEG or
# PNG bytes (54.2 MiB of JPEGs stayed 54.2 MiB) and cost 0.49 ms per 55 KB record against 0.09 ms. Readers take the
# options from the file. The staging file and its reader keep one chunk in flight: the default parallelism buffers
# several chunks per thread, which cost 100 MB of RSS when copying a split and bought no speed here.
WRITER_OPTIONS = "group_size:1,uncompressed"
STAGING_OPTIONS = "group_size:1,uncompressed,max_parallelism:1"
# The file that marks a directory as written by this module, with what the loaders need beyond TFDS's metadata.
METADATA_FILE = "resnext_jax.json"
_INCOMPLETE = ".incomplete-"


def md5_key(salt: str, key: str) -> tuple[int, int]:
    """TFDS's `hashing.Hasher(salt).hash_key(key)` as (high, low) 64-bit halves, so numpy can sort it."""
    import hashlib

    value = int(hashlib.md5(salt.encode() + key.encode()).hexdigest(), 16)
    return value >> 64, value & (2**64 - 1)


class SplitWriter:
    """Streams one split's examples into a staging file, then writes them in TFDS's key-hash order as shards."""

    def __init__(self, directory: str, dataset: str, split: str, features):
        from array_record.python import array_record_module
        from tensorflow_datasets.core import example_serializer

        self.directory, self.dataset, self.split, self.features = directory, dataset, split, features
        # TFDS's serializer, but the protos are written with protobuf's deterministic (sorted) map order, so the
        # same input gives the same bytes in every process; TFDS's own order follows the process's string hashing.
        self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        self._staging_path = os.path.join(directory, f"staging-{split}.array_record")
        self._staging = array_record_module.ArrayRecordWriter(self._staging_path, STAGING_OPTIONS)
        # 24 bytes per example (31 MB for ImageNet's train split); no keys and no images are kept.
        self._high, self._low, self._sizes = array.array("Q"), array.array("Q"), array.array("q")
        self.shard_lengths: list[int] = []
        self.num_bytes = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def add(self, key: str, example: dict) -> int:
        """Serializes `example` (a dict matching `features`) under the unique `key`; returns its size in bytes."""
        proto = self._serializer.get_tf_example(self.features.encode_example(example))
        record = proto.SerializeToString(deterministic=True)
        _write(self._staging, record, self._staging_path)
        high, low = md5_key(self.split, key)
        self._high.append(high)
        self._low.append(low)
        self._sizes.append(len(record))
        return len(record)

    def _shard_path(self, shard: int, num_shards: int) -> str:
        return os.path.join(self.directory, f"{self.dataset}-{self.split}.array_record-{shard:05d}-of-{num_shards:05d}")

    def close(self) -> None:
        """Writes the shards in hash order and removes the staging file."""
        from array_record.python import array_record_module

        _close(self._staging, self._staging_path, len(self._sizes))
        sizes = np.frombuffer(self._sizes, np.int64)
        high, low = np.frombuffer(self._high, np.uint64), np.frombuffer(self._low, np.uint64)
        order = np.lexsort((low, high))
        high, low = high[order], low[order]
        if ((high[1:] == high[:-1]) & (low[1:] == low[:-1])).any():  # equal md5s: one key twice (TFDS refuses it)
            raise ValueError(f"split {self.split} has a duplicate example key")
        self.num_bytes = int(sizes.sum())
        num_shards = max(1, math.ceil(self.num_bytes / MAX_SHARD_BYTES))
        bounds = np.linspace(0, len(order), num_shards + 1).round().astype(int)
        if num_shards == 1 and np.array_equal(order, np.arange(len(order))):  # came in stored order (folders do)
            os.rename(self._staging_path, self._shard_path(0, 1))
            self.shard_lengths.append(len(order))
            return
        reader = array_record_module.ArrayRecordReader(self._staging_path, "readahead_buffer_size:0,max_parallelism:1")
        for shard in range(num_shards):
            path = self._shard_path(shard, num_shards)
            writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
            for start in range(bounds[shard], bounds[shard + 1], 64):
                indices = order[start : min(start + 64, bounds[shard + 1])].tolist()
                for record in reader.read(indices):
                    _write(writer, record, path)
            _close(writer, path, int(bounds[shard + 1] - bounds[shard]))
            self.shard_lengths.append(int(bounds[shard + 1] - bounds[shard]))
        reader.close()
        os.remove(self._staging_path)


class DatasetWriter:
    """A context manager that writes `<data_dir>/<name>[/<config>]/<version>/` or nothing at all.

    Usage: `with DatasetWriter(...) as writer: split = writer.split("train"); split.add(key, example); ...`.
    On leaving without error the splits are closed, the metadata written and the directory renamed into place.
    On any error (or Ctrl-C) the temporary directory is removed; a full or read-only disk becomes one `UserError`.
    """

    def __init__(
        self,
        data_dir: str,
        name: str,
        version: str,
        features,
        *,
        config: str | None = None,
        description: str = "",
        metadata: dict | None = None,
        overwrite: bool = False,
    ):
        self.data_dir, self.name, self.version, self.config = data_dir, name, version, config
        self.features, self.description, self.metadata = features, description, dict(metadata or {})
        self.overwrite = overwrite
        parts = [data_dir, name] + ([config] if config else [])
        self.parent = os.path.join(*parts)
        self.target = os.path.join(self.parent, version)
        self.temporary = os.path.join(self.parent, f"{_INCOMPLETE}{version}-{os.getpid()}")
        self.splits: dict[str, SplitWriter] = {}
        self.started = time.perf_counter()
        self._lock = None  # the per-dataset prepare lock, held from __enter__ to __exit__
        self._replacing = None  # the identity of the dataset this run means to replace (None: there was none)

    @property
    def display_name(self) -> str:
        return f"{self.name}/{self.config}" if self.config else self.name

    def __enter__(self) -> DatasetWriter:  # noqa: PYI034 - not subclassed
        if os.path.exists(os.path.join(self.target, "dataset_info.json")) and not self.overwrite:
            raise UserError(
                f"{self.target} already holds a prepared {self.display_name}; pass --overwrite to "
                f"replace it, or choose another --name or --data-dir"
            )
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            self._lock = _take_lock(self.data_dir, self.display_name)
        except OSError as error:
            raise _disk_user_error(error, self.data_dir, self.display_name, removed=False) from error
        try:
            # Checked again under the lock: a prepare that held it may have written the dataset meanwhile.
            self._replacing = _identity(self.target)
            if self._replacing is not None and not self.overwrite:
                raise UserError(
                    f"{self.target} already holds a prepared {self.display_name} (written by another prepare "
                    f"while this one started); pass --overwrite to replace it, or choose another --name"
                )
            os.makedirs(self.parent, exist_ok=True)
            _remove_stale_temporaries(self.parent)
            os.makedirs(self.temporary)
        except BaseException as error:
            _release_lock(self._lock)
            if isinstance(error, OSError):
                raise _disk_user_error(error, self.data_dir, self.display_name, removed=False) from error
            raise
        return self

    def split(self, split: str) -> SplitWriter:
        """Returns the writer of `split` (created on first use)."""
        if split not in self.splits:
            self.splits[split] = SplitWriter(self.temporary, self.name, split, self.features)
        return self.splits[split]

    def __exit__(self, kind, error, trace) -> bool:
        try:
            return self._exit(error)
        finally:
            _release_lock(self._lock)

    def _exit(self, error) -> bool:
        if error is None:
            try:
                self._finish()
                return False
            except BaseException as finish_error:  # the same cleanup as an error inside the block
                self._remove_temporary()
                if isinstance(finish_error, OSError):
                    raise _disk_user_error(
                        finish_error, self.data_dir, self.display_name, removed=True
                    ) from finish_error
                raise
        self._remove_temporary()
        if isinstance(error, OSError):
            raise _disk_user_error(error, self.data_dir, self.display_name, removed=True) from error
        return False

    def _finish(self) -> None:
        for writer in self.splits.values():
            writer.close()
        self.features.save_config(self.temporary)
        self.features.save_metadata(self.temporary)
        with open(os.path.join(self.temporary, "dataset_info.json"), "w") as file:
            json.dump(self._dataset_info(), file, indent=2)
        with open(os.path.join(self.temporary, METADATA_FILE), "w") as file:
            json.dump({"format": 1, **self.metadata}, file, indent=2)
        if _identity(self.target) != self._replacing:  # only a writer outside the lock (another machine) gets here
            raise UserError(
                f"{self.target} was written by another prepare while this one ran; it is kept and this run's "
                f"output removed. Rerun with --overwrite to replace it, or choose another --name"
            )
        old = None
        if os.path.exists(self.target):  # only with overwrite (checked on entry): swap, then delete the old one
            old = f"{self.target}.old-{os.getpid()}"
            os.rename(self.target, old)
        os.rename(self.temporary, self.target)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def _dataset_info(self) -> dict:
        """The subset of TFDS's DatasetInfo proto (as JSON) that readers use."""
        info = {
            "name": self.name,
            "description": self.description,
            "fileFormat": "array_record",
            "moduleName": "resnext_jax.data.prepare",
            "version": self.version,
            "splits": [
                {
                    "name": name,
                    "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                    "numBytes": str(writer.num_bytes),
                    "shardLengths": [str(n) for n in writer.shard_lengths],
                }
                for name, writer in self.splits.items()
            ],
            "supervisedKeys": {"tuple": {"items": [{"featureKey": "image"}, {"featureKey": "label"}]}},
        }
        if self.config:
            info["configName"] = self.config
        return info

    def _remove_temporary(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)
        try:  # leave no empty <name>/ (or <name>/<config>/) folder behind a run that wrote nothing
            os.removedirs(self.parent)
        except OSError:
            pass


def _check(writer, path: str) -> None:
    """Raises the OSError that ArrayRecordWriter swallows: on a full disk its writes and close() return quietly
    and only `ok()` turns False, so a silently truncated shard would otherwise be renamed into place."""
    if not writer.ok():
        _raise_write_error(path)


def _write(writer, record: bytes, path: str) -> None:
    try:
        writer.write(record)
    except RuntimeError as error:
        _raise_from_riegeli(error, path)
    _check(writer, path)


def _raise_from_riegeli(error: RuntimeError, path: str) -> None:
    """Riegeli reports I/O failures as RuntimeError with the errno only in the text."""
    if "No space left" in str(error):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from error
    raise OSError(errno.EIO, str(error).splitlines()[0], path) from error


def _close(writer, path: str, expected: int) -> None:
    """Closes an ArrayRecordWriter and proves the file whole by reopening it (`ok()` is False after any close,
    so it cannot tell a failed final flush from a good one)."""
    from array_record.python import array_record_module

    _check(writer, path)
    try:
        writer.close()
    except RuntimeError as error:
        _raise_from_riegeli(error, path)
    try:
        reader = array_record_module.ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
    except Exception:  # noqa: BLE001 - a file cut short by a full disk has no valid footer, whatever the type
        count = -1
    if count != expected:
        _raise_write_error(path)


def _raise_write_error(path: str) -> None:
    free = shutil.disk_usage(os.path.dirname(path)).free
    if free < 4 * 2**20:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    raise OSError(errno.EIO, f"ArrayRecord writer failed ({free / 2**20:.0f} MiB free)", path)


def _take_lock(data_dir: str, name: str):
    """An exclusive `flock` on `<data_dir>/.<name>.prepare-lock`, which holds the holder's pid and start time for
    the message a second prepare of the same name gets. The kernel drops it when its process dies; a release
    removes the file, so the lock is re-taken when the file it locked was removed meanwhile."""
    path = os.path.join(data_dir, f".{name.replace('/', '-')}.prepare-lock")
    while True:
        file = open(path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(
                f"another prepare of {name} is running in {data_dir} ({holder}); wait for it to finish, "
                f"or choose another --name"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(file.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        file.close()  # the holder released and removed it between our open and flock
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    file.flush()
    return file


def _release_lock(file) -> None:
    if file is not None and not file.closed:
        try:
            os.remove(file.name)  # while still holding it, so no one locks the file being removed
        except OSError:
            pass
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        file.close()


def _identity(target: str) -> tuple[int, int, int] | None:
    """(device, inode, modification time) of `target`'s dataset_info.json: which write of the dataset is there."""
    try:
        status = os.stat(os.path.join(target, "dataset_info.json"))
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def _remove_stale_temporaries(parent: str) -> None:
    """Removes the temporary directories of earlier runs whose process is gone (killed with -9, power loss)."""
    for entry in os.listdir(parent):
        match = re.fullmatch(re.escape(_INCOMPLETE) + r".*-(\d+)", entry)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # our own pid here is a recycled one: ours is not created yet


def _disk_user_error(error: OSError, path: str, what: str, *, removed: bool) -> Exception:
    converted = disk_error(error, path, what)
    if not isinstance(converted, UserError):
        return converted
    if removed:
        return UserError(f"{converted}; the partial {what} was removed, nothing half-written is left")
    return converted
