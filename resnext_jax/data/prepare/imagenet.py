"""`prepare imagenet2012`: ILSVRC2012_img_train.tar (a tar of 1000 per-class tars) and ILSVRC2012_img_val.tar.

Labels are the 1000 sorted synsets of TFDS's `imagenet2012/labels.txt`; the validation images are labelled by
TFDS's `validation_labels.txt` (one synset per line, in file-name order), both shipped in the tensorflow-datasets
package, so nothing is downloaded. Both tars are streamed once; the nested class tars are read in stream mode too.

TFDS re-encodes the 22 CMYK JPEGs and the one PNG named .JPEG (n02105855_2933.JPEG) with TensorFlow. We store
every file as it is, which is what torchvision's ImageFolder reads: PIL opens both and the loaders convert them to
RGB exactly as `ImageFolder`'s `pil_loader` does, so training sees torchvision's pixels.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterator

from resnext_jax.data.prepare import images
from resnext_jax.data.prepare.archives import _members, _open_tar, _require_splits
from resnext_jax.data.prepare.pipeline import Item, Report, rerun_command, write_items
from resnext_jax.data.prepare.writer import DatasetWriter
from resnext_jax.errors import UserError

VERSION = "5.1.0"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def imagenet_labels() -> tuple[list[str], list[str]]:
    """Returns (the 1000 synsets in label order, the 50,000 validation synsets in file-name order)."""
    import tensorflow_datasets as tfds

    folder = tfds.core.tfds_path("datasets/imagenet2012")
    synsets = (folder / "labels.txt").read_text().split()
    validation = (folder / "validation_labels.txt").read_text().split()
    return synsets, validation


def _train_items(path: str, label_of: dict[str, int], report: Report) -> Iterator[Item]:
    with _open_tar(path, TRAIN_TAR) as outer:
        for class_tar, data in _members(outer, path):
            synset = os.path.basename(class_tar).removesuffix(".tar")
            if not class_tar.endswith(".tar") or synset not in label_of:
                report.skipped.append((f"{TRAIN_TAR}:{class_tar}", "not one of the 1000 class tars"))
                continue
            # A class tar is 50-150 MB; reading it whole keeps the outer stream simple and memory bounded by it.
            try:
                inner = tarfile.open(fileobj=io.BytesIO(data), mode="r|")  # noqa: SIM115 - closed by `with` below
            except tarfile.TarError as error:
                raise UserError(f"{path}: {class_tar} is not a tar ({error}); download {TRAIN_TAR} again") from error
            with inner:
                for member, image in _members(inner, f"{path}:{class_tar}"):
                    name = os.path.basename(member)
                    if not images.is_image_name(name):
                        report.ignore("non-image files", f"{class_tar}:{member}")
                        continue
                    yield Item(
                        split="train",
                        key=name,
                        label=label_of[synset],
                        source=image,
                        name=f"{TRAIN_TAR}:{class_tar}:{member}",
                        extra={"file_name": name},
                    )


def _val_items(path: str, label_of: dict[str, int], validation: list[str], report: Report) -> Iterator[Item]:
    with _open_tar(path, VAL_TAR) as archive:
        for member, image in _members(archive, path):
            name = os.path.basename(member)
            stem = name.split(".")[0]
            try:
                number = int(stem.rsplit("_", 1)[1])  # ILSVRC2012_val_00000001.JPEG -> 1
                synset = validation[number - 1]
            except (IndexError, ValueError):
                report.skipped.append((f"{VAL_TAR}:{member}", "not an ILSVRC2012_val_NNNNNNNN.JPEG file"))
                continue
            yield Item(
                split="validation",
                key=name,
                label=label_of[synset],
                source=image,
                name=f"{VAL_TAR}:{member}",
                extra={"file_name": name},
            )


def prepare_imagenet(
    source: str, *, data_dir: str, workers: int = 0, overwrite: bool = False, quiet: bool = False
) -> Report:
    """Prepares imagenet2012 (train and validation) from the folder `source` that holds the two tars."""
    from resnext_jax.data.prepare.archives import _imagenet_like_features

    started = time.perf_counter()
    paths = {tar: os.path.join(source, tar) for tar in (TRAIN_TAR, VAL_TAR)}
    missing = [tar for tar, path in paths.items() if not os.path.isfile(path)]
    if missing:
        raise UserError(
            f"{source} lacks {', '.join(missing)}; download them from https://image-net.org/ into "
            f"that folder (the tars as downloaded, not extracted)"
        )
    synsets, validation = imagenet_labels()
    label_of = {synset: label for label, synset in enumerate(synsets)}
    report = Report(class_names=synsets)
    metadata = {
        "source": f"imagenet2012 {os.path.abspath(source)}",
        "train_split": "train",
        "eval_split": "validation",
        "class_names": synsets,
        "command": rerun_command("imagenet2012", "--from", os.path.abspath(source), data_dir=data_dir),
    }

    def items() -> Iterator[Item]:
        yield from _train_items(paths[TRAIN_TAR], label_of, report)
        yield from _val_items(paths[VAL_TAR], label_of, validation, report)

    with DatasetWriter(
        data_dir,
        "imagenet2012",
        VERSION,
        _imagenet_like_features(synsets, True),
        metadata=metadata,
        description="ILSVRC 2012 from the original tars",
        overwrite=overwrite,
    ) as writer:
        write_items(writer, items(), report, workers=workers, quiet=quiet)
        _require_splits(report, source, ("train", "validation"))
    report.seconds, report.target = time.perf_counter() - started, writer.target
    return report
