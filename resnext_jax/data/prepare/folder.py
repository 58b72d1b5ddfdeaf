"""`prepare folder`: a torchvision ImageFolder tree (`root/<class>/<image>`) as an ArrayRecord dataset.

Class names are the sorted subfolder names, as in torchvision. The validation split (without `--val-dir`) is
chosen per class by an md5 hash of each file's path relative to the root, so the same files give the same split on
every machine, every class is represented in proportion, and adding a file moves no other file across the split.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from resnext_jax.data.prepare import images
from resnext_jax.data.prepare.pipeline import Item, Report, rerun_command, write_items
from resnext_jax.data.prepare.writer import DatasetWriter, md5_key
from resnext_jax.errors import UserError

VERSION = "1.0.0"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
# The usual working resolution of a folder of photos (what DatasetInfo.image_size reports).
DEFAULT_IMAGE_SIZE = 224


def check_name(name: str) -> None:
    """Refuses names TFDS cannot use as a directory name or that we already define (digits, cifar10, ...)."""
    from resnext_jax.data import datasets

    if not NAME_PATTERN.fullmatch(name):
        raise UserError(
            f"--name {name!r} is not a valid dataset name; use lower-case letters, digits and _, "
            f"starting with a letter (e.g. my_flowers)"
        )
    if name in datasets.BUILT_IN or name.split("/")[0] in datasets.BUILT_IN:
        raise UserError(f"--name {name!r} is a built-in dataset; choose another name for your folder")


def _class_folders(root: str, what: str) -> list[str]:
    if not os.path.isdir(root):
        raise UserError(f"{what} {root} is not a directory; pass a folder laid out as {what}/<class>/<image>.jpg")
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as error:
        raise UserError(f"cannot list {root} ({error.strerror}); check its permissions") from error
    return [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]


def scan(root: str, class_names: list[str], report: Report, what: str) -> dict[int, list[tuple[str, str]]]:
    """Lists the image files of each class folder: label -> sorted [(path relative to root, absolute path)].

    Symbolic links are followed (as torchvision does), but every directory and file is read once, by its real
    path: a directory reached twice (a loop) is entered once, and a link into another class's folder, or back to
    the folder being prepared, is never entered, so no image is ever labelled with a class it is not in. Each skip
    is listed in `report`, as are broken links; non-image files and files outside class folders are counted.
    """
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith("."):
            report.ignore("hidden entries", os.path.join(what, entry))
        elif not os.path.isdir(path):
            report.ignore("files outside class folders", os.path.join(what, entry))
    root_real = os.path.realpath(root)
    owners: dict[str, str] = {}
    for name in class_names:  # a class folder that links to another's belongs to the first
        owners.setdefault(os.path.realpath(os.path.join(root, name)), name)
    directories_read: set[str] = set()
    files_read: dict[str, str] = {}  # real path -> the relative path it was first listed under
    files: dict[int, list[tuple[str, str]]] = {}
    for label, class_name in enumerate(class_names):
        class_root = os.path.join(root, class_name)
        if not os.path.isdir(class_root):
            continue
        found = []
        for directory, subdirectories, names in os.walk(
            class_root, followlinks=True, onerror=lambda error: _walk_error(error, report)
        ):
            real = os.path.realpath(directory)
            why = _skip_directory(real, class_name, owners, root_real, directories_read)
            if why:
                report.skipped.append((directory, why))
                subdirectories[:] = []
                continue
            directories_read.add(real)
            subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
            for name in sorted(names):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                if name.startswith("."):
                    report.ignore("hidden files", os.path.join(what, relative))
                elif not images.is_image_name(name):
                    report.ignore("non-image files", os.path.join(what, relative))
                elif not os.path.exists(path):
                    report.skipped.append((path, "broken symbolic link"))
                elif os.path.realpath(path) in files_read:
                    report.skipped.append((path, f"the same file as {files_read[os.path.realpath(path)]} (read once)"))
                else:
                    files_read[os.path.realpath(path)] = relative
                    found.append((relative, path))
        if not found:
            raise UserError(
                f"class folder {class_root} has no images ({', '.join(images.IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        files[label] = found
    return files


def _skip_directory(real: str, class_name: str, owners: dict[str, str], root_real: str, read: set[str]) -> str:
    """Why the directory at real path `real`, reached from class `class_name`'s folder, must not be read ('' if
    it may): read already, inside another class's folder, or the prepared folder (or a folder holding it)."""
    if real in read:
        return "symlink loop (directory already read)"
    inside = [owner for path, owner in owners.items() if real == path or real.startswith(path + os.sep)]
    if inside and class_name not in inside:
        return f"a link into class {inside[0]!r}'s folder (not read, so its images keep their own label)"
    if not inside and (
        real == root_real or (real + os.sep).startswith(root_real + os.sep) or root_real.startswith(real + os.sep)
    ):
        return "a link to the folder being prepared (not read, so no other class's image is relabelled)"
    return ""


def _walk_error(error: OSError, report: Report) -> None:
    report.skipped.append((str(error.filename), f"unreadable directory ({error.strerror})"))


def _hash(relative: str) -> str:
    return hashlib.md5(relative.encode()).hexdigest()


def split_files(files: list[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
    """Splits one class's files into (train, validation): the round(val_fraction * n) files with the smallest
    md5 of their relative path are validation (at least one, and at least one left for training when n >= 2)."""
    ordered = sorted(files, key=lambda file: _hash(file[0]))
    count = min(max(1, round(val_fraction * len(files))), len(files) - 1) if len(files) >= 2 else 0
    return ordered[count:], ordered[:count]


def prepare_folder(
    root: str,
    name: str,
    *,
    data_dir: str,
    val_dir: str | None = None,
    val_fraction: float = 0.1,
    workers: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
) -> Report:
    """Prepares the image folder `root` as dataset `name` in `data_dir` (see the module docstring); returns the
    report. Raises UserError for an unusable folder, an existing dataset (without `overwrite`) or a full disk."""
    started = time.perf_counter()
    check_name(name)
    if not val_dir and not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (e.g. 0.1), or pass --val-dir")
    root = os.path.abspath(root)
    class_names = _class_folders(root, "DIR")
    if not class_names:
        raise UserError(f"{root} has no class subfolders; lay the images out as {root}/<class>/<image>.jpg")
    if len(class_names) == 1:
        raise UserError(
            f"{root} has only one class folder ({class_names[0]!r}); a classifier needs at least two "
            f"classes, as {root}/<class>/<image>.jpg"
        )
    report = Report(class_names=class_names)
    files = scan(root, class_names, report, os.path.basename(root))
    if val_dir:
        val_dir = os.path.abspath(val_dir)
        unknown = sorted(set(_class_folders(val_dir, "--val-dir")) - set(class_names))
        if unknown:
            raise UserError(
                f"--val-dir {val_dir} has class folders that {root} lacks: {unknown}; use the same class names in both"
            )
        train = {label: found for label, found in files.items()}
        validation = scan(val_dir, class_names, report, os.path.basename(val_dir))
    else:
        train, validation = {}, {}
        for label, found in files.items():
            train[label], validation[label] = split_files(found, val_fraction)

    if not any(validation.values()):
        raise UserError(f"no class in {root} has the 2 images a validation split needs; add images or pass --val-dir")
    split_arguments = ["--val-dir", val_dir] if val_dir else ["--val-fraction", str(val_fraction)]
    command = rerun_command("folder", root, "--name", name, *split_arguments, data_dir=data_dir)
    features = folder_features(class_names)
    metadata = {
        "source": f"folder {root}",
        "train_split": "train",
        "eval_split": "validation",
        "image_size": DEFAULT_IMAGE_SIZE,
        "class_names": class_names,
        "command": command,
    }
    with DatasetWriter(
        data_dir, name, VERSION, features, description=f"Images from {root}.", metadata=metadata, overwrite=overwrite
    ) as writer:
        # In the order the writer stores them, so it writes each split once instead of copying it into order.
        items = sorted(
            (
                Item(split=split, key=relative, label=label, source=path, name=path, extra={"file_name": relative})
                for split, by_label in (("train", train), ("validation", validation))
                for label, found in by_label.items()
                for relative, path in found
            ),
            key=lambda item: (item.split, md5_key(item.split, item.key)),
        )
        write_items(writer, items, report, workers=workers, total=len(items), stats_split="train", quiet=quiet)
        _check_every_class_written(report, class_names)
        writer.metadata["mean"], writer.metadata["std"] = report.mean_std()
    report.seconds = time.perf_counter() - started
    report.target = writer.target
    return report


def _check_every_class_written(report: Report, class_names: list[str]) -> None:
    empty = [class_names[label] for label in range(len(class_names)) if not report.written["train"][label]]
    if empty:
        examples = "; ".join(f"{name}: {why}" for name, why in report.skipped[:3])
        raise UserError(
            f"no usable training image in class folder(s) {empty} (skipped, e.g. {examples}); "
            f"add images that open, or remove those folders"
        )


def folder_features(class_names: list[str]):
    """TFDS features of a folder dataset: encoded image (any format PIL reads), label, relative file name."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(),
            "label": tfds.features.ClassLabel(names=class_names),
            "file_name": tfds.features.Text(),
        }
    )
