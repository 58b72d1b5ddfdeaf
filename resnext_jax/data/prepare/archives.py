"""`prepare cifar10|cifar100|imagenette|imagenet2012`: the original archives as TFDS-compatible datasets.

Each writes the directory, features and versions of the TFDS builder of the same name (cifar10 3.0.2, imagenette
1.0.0, imagenet2012 5.1.0), so a copy prepared by TFDS with TensorFlow and one prepared here are interchangeable.
Archives are streamed member by member (tar files are read once, front to back); CIFAR is read from its binary
version only, never the pickled Python one, because unpickling a download runs whatever code it holds.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Iterator

import numpy as np

from resnext_jax.data.prepare import images
from resnext_jax.data.prepare.pipeline import Item, Report, rerun_command, write_items
from resnext_jax.data.prepare.writer import DatasetWriter
from resnext_jax.errors import UserError

CIFAR_VERSION = "3.0.2"
IMAGENETTE_VERSION = "1.0.0"
IMAGENET_VERSION = "5.1.0"
_CIFAR = {  # name: (archive folder, train files, test file, label files, bytes of labels before the pixels)
    "cifar10": (
        "cifar-10-batches-bin",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test_batch.bin",
        ["batches.meta.txt"],
        1,
    ),
    "cifar100": ("cifar-100-binary", ["train.bin"], "test.bin", ["coarse_label_names.txt", "fine_label_names.txt"], 2),
}
_IMAGENETTE_CONFIGS = {"imagenette2": "full-size-v2", "imagenette2-320": "320px-v2", "imagenette2-160": "160px-v2"}


def _open_tar(path: str, what: str) -> tarfile.TarFile:
    """Opens a tar (any compression) for streaming, with the fix in the error if it is not one."""
    if not os.path.isfile(path):
        raise UserError(f"--from {path} does not exist; pass the downloaded {what}")
    try:
        return tarfile.open(path, "r|*")
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"{path} is not a readable tar archive ({error}); download {what} again") from error


def _members(archive: tarfile.TarFile, path: str) -> Iterator[tuple[str, bytes]]:
    """Yields (member name, bytes) of the regular files, turning a cut-off archive into a UserError."""
    try:
        for member in archive:
            if member.isfile():
                yield member.name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"{path} ends early or is damaged ({error}); download it again") from error


def _cifar_names(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode().splitlines() if line.strip()]


def prepare_cifar(
    name: str, archive_path: str, *, data_dir: str, workers: int = 0, overwrite: bool = False, quiet: bool = False
) -> Report:
    """Prepares cifar10 or cifar100 from the binary archive (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz).

    Records are 1 label byte (CIFAR-100: coarse label, then fine label) and 3072 bytes of pixels, R then G then B
    planes of 32x32; images are stored as PNG with the example id `train_00000` / `test_00000` as TFDS does.
    """
    import tensorflow_datasets as tfds

    started = time.perf_counter()
    folder, train_files, test_file, label_files, label_bytes = _CIFAR[name]
    wanted = {f"{folder}/{file}" for file in train_files + [test_file] + label_files}
    contents = {}
    with _open_tar(archive_path, f"{name}'s binary archive") as archive:
        for member, data in _members(archive, archive_path):
            if member in wanted:
                contents[member] = data
            elif member.startswith(("cifar-10-batches-py/", "cifar-100-python/")):
                raise UserError(
                    f"{archive_path} is CIFAR's pickled Python version, which we never unpickle (it "
                    f"can run code); download the binary version, cifar-10-binary.tar.gz or "
                    f"cifar-100-binary.tar.gz"
                )
    missing = sorted(wanted - set(contents))
    if missing:
        raise UserError(
            f"{archive_path} lacks {missing}; it is not {name}'s binary archive "
            f"({'cifar-10-binary.tar.gz' if name == 'cifar10' else 'cifar-100-binary.tar.gz'})"
        )
    names = [_cifar_names(contents[f"{folder}/{file}"]) for file in label_files]
    class_names = names[-1]
    record_size = label_bytes + 3072
    feature_dict = {
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(names=class_names),
    }
    if name == "cifar100":
        feature_dict["coarse_label"] = tfds.features.ClassLabel(names=names[0])
    report = Report(class_names=class_names)
    metadata = {
        "source": f"{name} {os.path.abspath(archive_path)}",
        "train_split": "train",
        "eval_split": "test",
        "class_names": class_names,
        "command": rerun_command(name, "--from", os.path.abspath(archive_path), data_dir=data_dir),
    }

    def items(split: str, files: list[str]) -> Iterator[Item]:
        data = b"".join(contents[f"{folder}/{file}"] for file in files)
        if len(data) % record_size:
            raise UserError(
                f"{archive_path}: {split} data is {len(data)} bytes, not a whole number of "
                f"{record_size}-byte records; download the archive again"
            )
        records = np.frombuffer(data, np.uint8).reshape(-1, record_size)
        for index, record in enumerate(records):
            key = f"{split}_{index:05d}"
            extra = {"id": key}
            if name == "cifar100":
                extra["coarse_label"] = int(record[0])
            pixels = np.ascontiguousarray(record[label_bytes:].reshape(3, 32, 32).transpose(1, 2, 0))
            yield Item(split=split, key=key, label=int(record[label_bytes - 1]), source=pixels, name=key, extra=extra)

    with DatasetWriter(
        data_dir,
        name,
        CIFAR_VERSION,
        tfds.features.FeaturesDict(feature_dict),
        metadata=metadata,
        description=f"{name} from {os.path.basename(archive_path)}",
        overwrite=overwrite,
    ) as writer:
        for split, files in (("train", train_files), ("test", [test_file])):
            total = sum(len(contents[f"{folder}/{file}"]) for file in files) // record_size
            write_items(writer, items(split, files), report, workers=workers, total=total, quiet=quiet)
    report.seconds, report.target = time.perf_counter() - started, writer.target
    return report


def _imagenet_like_features(class_names: list[str], file_name: bool):
    import tensorflow_datasets as tfds

    features = {
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=class_names),
    }
    if file_name:
        features["file_name"] = tfds.features.Text()
    return tfds.features.FeaturesDict(features)


def _top_folder(archive_path: str, what: str) -> str:
    """The first member's top folder (reads one tar header)."""
    with _open_tar(archive_path, what) as archive:
        for member, _ in _members(archive, archive_path):
            return member.split("/")[0]
    raise UserError(f"{archive_path} is empty; download {what} again")


def prepare_imagenette(
    archive_path: str, *, data_dir: str, workers: int = 0, overwrite: bool = False, quiet: bool = False
) -> Report:
    """Prepares imagenette from imagenette2.tgz, imagenette2-320.tgz or imagenette2-160.tgz: the TFDS config
    (full-size-v2, 320px-v2, 160px-v2) follows from the archive's top folder; images are stored as they are."""
    import tensorflow_datasets as tfds

    from resnext_jax.data.datasets import IMAGENETTE_CLASSES

    started = time.perf_counter()
    what = "imagenette2[-320|-160].tgz"
    top = _top_folder(archive_path, what)
    if top not in _IMAGENETTE_CONFIGS:
        raise UserError(
            f"{archive_path} holds {top}/, not imagenette2, imagenette2-320 or imagenette2-160; pass "
            f"one of those archives from https://github.com/fastai/imagenette"
        )
    config = _IMAGENETTE_CONFIGS[top]
    synsets = _cifar_names(tfds.core.tfds_path("image_classification/imagenette_labels.txt").read_bytes())
    label_of = {synset: label for label, synset in enumerate(synsets)}
    report = Report(class_names=list(IMAGENETTE_CLASSES))
    metadata = {
        "source": f"imagenette {os.path.abspath(archive_path)}",
        "train_split": "train",
        "eval_split": "validation",
        "class_names": list(IMAGENETTE_CLASSES),
        "command": rerun_command("imagenette", "--from", os.path.abspath(archive_path), data_dir=data_dir),
    }

    def items(archive) -> Iterator[Item]:
        for member, data in _members(archive, archive_path):
            parts = member.split("/")
            if len(parts) != 4 or parts[1] not in ("train", "val"):
                report.ignore("archive members outside train/ and val/", member)
            elif parts[2] not in label_of:
                report.skipped.append((member, f"unknown class folder {parts[2]}"))
            elif not images.is_image_name(parts[3]):
                report.ignore("non-image files", member)
            else:
                split = "train" if parts[1] == "train" else "validation"
                yield Item(split=split, key=member, label=label_of[parts[2]], source=data, name=member)

    with DatasetWriter(
        data_dir,
        "imagenette",
        IMAGENETTE_VERSION,
        _imagenet_like_features(synsets, False),
        config=config,
        metadata=metadata,
        overwrite=overwrite,
        description=f"imagenette/{config} from {os.path.basename(archive_path)}",
    ) as writer:
        with _open_tar(archive_path, what) as archive:
            write_items(writer, items(archive), report, workers=workers, quiet=quiet)
        _require_splits(report, archive_path, ("train", "validation"))
    report.seconds, report.target = time.perf_counter() - started, writer.target
    return report


def _require_splits(report: Report, path: str, splits: tuple[str, ...]) -> None:
    missing = [split for split in splits if not sum(report.written.get(split, {}).values())]
    if missing:
        raise UserError(
            f"{path} gave no usable {' or '.join(missing)} images; check that it is the right archive "
            f"and download it again"
        )
