"""Dataset catalogue: the datasets we know, folder datasets the user prepared, and opening either as a source.

A prepared dataset is a directory in TFDS's ArrayRecord layout, `<data_dir>/<name>[/<config>]/<version>/`, written
by `python -m resnext_jax.data.prepare` (or by TFDS itself). It is read with `tfds.builder_from_directory`, which
needs neither TensorFlow nor the TFDS builder's code, so a folder of the user's own images reads like CIFAR. A
dataset that is not prepared fails here, before any loader is built, with the command that prepares it.
"""

import dataclasses
import json
import os
import re

from resnext_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPARE = "python -m resnext_jax.data.prepare"


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset is not prepared (or not readable); the message gives the command that prepares it."""


class UnknownDatasetError(UserError, ValueError):
    """A name that is neither a built-in dataset nor a prepared folder dataset."""


class CorruptDatasetError(UserError, OSError):
    """A dataset file fails its checksum or cannot be opened; the message names the file and how to rebuild it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a training run needs to know about a dataset.

    Attributes:
      name: the dataset name, e.g. 'imagenette/320px-v2' or a prepared folder's name.
      num_classes: number of labels.
      num_train: examples in `train_split`.
      num_eval: examples in `eval_split`.
      train_split: split used for training.
      eval_split: split used for evaluation.
      mean: per-channel RGB mean on the 0-1 scale, used to normalize images.
      std: per-channel RGB std on the 0-1 scale.
      image_size: the usual training resolution (32 for digits and CIFAR, 224 for ImageNet and folders).
      class_names: the name of each label, in label order (None if unknown), for predictions people can read.
    """

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    class_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Spec:
    num_classes: int
    eval_split: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    how_to_prepare: str
    class_names: tuple[str, ...] | None = None  # None: the label names stored with the dataset


_IMAGENETTE_HOWTO = (
    "Download {archive} from https://github.com/fastai/imagenette and run `"
    + PREPARE
    + " imagenette --from {archive} --data-dir {data_dir}`."
)
_CIFAR_HOWTO = (
    "Download the binary version, {archive}, from https://www.cs.toronto.edu/~kriz/cifar.html and run `"
    + PREPARE
    + " {name} --from {archive} --data-dir {data_dir}`."
)
_IMAGENET_HOWTO = (
    "Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org/ into one folder "
    "DIR and run `" + PREPARE + " imagenet2012 --from DIR --data-dir {data_dir}`."
)
# The ten Imagenette classes in label order (the sorted synsets n01440764 ... n03888257).
IMAGENETTE_CLASSES = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
)
_DIGITS = _Spec(
    10,
    "test",
    (0.3057, 0.3057, 0.3057),
    (0.3234, 0.3234, 0.3234),
    32,
    "digits is built offline from scikit-learn on first use; make {data_dir} writable.",
    tuple(str(digit) for digit in range(10)),
)
_IMAGENETTE = _Spec(10, "validation", IMAGENET_MEAN, IMAGENET_STD, 224, _IMAGENETTE_HOWTO, IMAGENETTE_CLASSES)

# Keys are dataset names; 'imagenette' alone means TFDS's default config, full-size-v2.
_SPECS = {
    "digits": _DIGITS,
    "imagenet2012": _Spec(1000, "validation", IMAGENET_MEAN, IMAGENET_STD, 224, _IMAGENET_HOWTO),
    "imagenette": _IMAGENETTE,
    "imagenette/full-size-v2": _IMAGENETTE,
    "imagenette/320px-v2": _IMAGENETTE,
    "imagenette/160px-v2": dataclasses.replace(_IMAGENETTE, image_size=128),
    "cifar10": _Spec(10, "test", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, _CIFAR_HOWTO),
    "cifar100": _Spec(100, "test", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, _CIFAR_HOWTO),
}
BUILT_IN = frozenset(_SPECS)
_ARCHIVES = {
    "cifar10": "cifar-10-binary.tar.gz",
    "cifar100": "cifar-100-binary.tar.gz",
    "imagenette": "imagenette2.tgz",
    "imagenette/full-size-v2": "imagenette2.tgz",
    "imagenette/320px-v2": "imagenette2-320.tgz",
    "imagenette/160px-v2": "imagenette2-160.tgz",
}
METADATA_FILE = "resnext_jax.json"  # written by resnext_jax.data.prepare beside TFDS's metadata


def supported_datasets() -> list[str]:
    """Returns the built-in dataset names; any folder prepared with `prepare folder` is accepted too."""
    return sorted(_SPECS)


def default_data_dir() -> str:
    """Returns $TFDS_DATA_DIR, or ~/tensorflow_datasets like TFDS itself."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def dataset_directory(name: str, data_dir: str) -> str | None:
    """Returns `<data_dir>/<name>[/<config>]/<version>` of the newest prepared version, or None."""
    parts = name.split("/") + (["full-size-v2"] if name == "imagenette" else [])
    parent = os.path.join(data_dir, *parts)
    try:
        versions = [
            entry
            for entry in os.listdir(parent)
            if re.fullmatch(r"\d+\.\d+\.\d+", entry)
            and os.path.exists(os.path.join(parent, entry, "dataset_info.json"))
        ]
    except OSError:
        return None
    if not versions:
        return None
    return os.path.join(parent, max(versions, key=lambda version: tuple(map(int, version.split(".")))))


def _howto(name: str, data_dir: str) -> str:
    if name in _SPECS:
        return _SPECS[name].how_to_prepare.format(name=name, data_dir=data_dir, archive=_ARCHIVES.get(name, ""))
    return f"Prepare it with `{PREPARE} folder DIR --name {name} --data-dir {data_dir}`."


def prepare_dataset(name: str, data_dir: str | None = None) -> None:
    """Builds `digits` in `data_dir` if it is not there yet (offline, once). Other datasets are prepared from their
    downloaded files with `python -m resnext_jax.data.prepare`; for them this only checks they are prepared."""
    data_dir = data_dir or default_data_dir()
    if name == "digits":
        from resnext_jax.data import digits

        if dataset_directory(name, data_dir) is None:
            digits.build(data_dir)
        return
    dataset_info(name, data_dir)


def _metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA_FILE)
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):  # absent (made by TFDS) or damaged: the TFDS metadata still suffices
        return {}


def _rebuild(name: str, data_dir: str, directory: str) -> str:
    """How to replace a damaged dataset directory: the command that made it, when we recorded one."""
    if name == "digits":
        return f"delete {directory}; digits is rebuilt on next use"
    command = _metadata(directory).get("command") if os.path.isdir(directory) else None
    if command:
        return f"prepare it again with `{command} --overwrite`"
    return f"delete {directory} and prepare it again. {_howto(name, data_dir)}"


def _read_only_builder(name: str, data_dir: str, directory: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder_from_directory(directory)
    except Exception as error:  # TFDS raises many types for a damaged dataset_info.json or features.json
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CorruptDatasetError(
            f"{directory} cannot be read as a dataset ({reason}); {_rebuild(name, data_dir, directory)}"
        ) from error


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Returns the DatasetInfo of a built-in or prepared folder dataset, building `digits` on first use.

    Raises:
      UnknownDatasetError (a ValueError): `name` is neither built in nor prepared in `data_dir`.
      DatasetNotFoundError (a FileNotFoundError): a built-in dataset is not prepared (the message says how), or was
        prepared as TFRecord instead of ArrayRecord.
    """
    data_dir = data_dir or default_data_dir()
    if name == "digits":
        prepare_dataset(name, data_dir)
    directory = dataset_directory(name, data_dir)
    if directory is None:
        if name in _SPECS:
            raise DatasetNotFoundError(f"Dataset {name!r} is not prepared in {data_dir}. {_howto(name, data_dir)}")
        raise UnknownDatasetError(
            f"Unknown dataset {name!r}: no prepared dataset {os.path.join(data_dir, name)} and not one of "
            f"{supported_datasets()}. To use your own images, run `{PREPARE} folder DIR --name {name} "
            f"--data-dir {data_dir}`."
        )
    if not any(".array_record" in file for file in os.listdir(directory)):
        raise DatasetNotFoundError(
            f"{directory} holds {name} as TFRecord, which needs TensorFlow to read. Prepare it again as ArrayRecord: "
            f"{_howto(name, data_dir)}"
        )
    builder = _read_only_builder(name, data_dir, directory)
    metadata = _metadata(directory)
    spec = _SPECS.get(name)
    splits = builder.info.splits
    label = builder.info.features["label"]
    stored_names = tuple(label.names) if label.names else None
    if spec is None:
        mean, std = tuple(metadata.get("mean", IMAGENET_MEAN)), tuple(metadata.get("std", IMAGENET_STD))
        eval_split, image_size, class_names = (
            metadata.get("eval_split", "validation"),
            metadata.get("image_size", 224),
            stored_names,
        )
    else:
        mean, std, eval_split, image_size = spec.mean, spec.std, spec.eval_split, spec.image_size
        class_names = spec.class_names or stored_names
    return DatasetInfo(
        name=name,
        num_classes=label.num_classes,
        num_train=splits["train"].num_examples,
        num_eval=splits[eval_split].num_examples,
        train_split="train",
        eval_split=eval_split,
        mean=mean,
        std=std,
        image_size=image_size,
        class_names=class_names,
    )


def open_source(name: str, split: str, data_dir: str | None = None):
    """Returns a grain-compatible random-access source whose records are {'image': encoded bytes, 'label': int}.

    Images are left encoded so that the loader decodes them with PIL (and can decode JPEGs at reduced size). A
    damaged file raises CorruptDatasetError naming it and the command that rebuilds it.
    """
    import tensorflow_datasets as tfds

    data_dir = data_dir or default_data_dir()
    dataset_info(name, data_dir)  # fails fast with the fix if the dataset is missing
    directory = dataset_directory(name, data_dir)
    builder = _read_only_builder(name, data_dir, directory)
    split_info = builder.info.splits[split]
    checked = _CheckedSource(None, directory, split_info, _rebuild(name, data_dir, directory))
    try:
        checked.source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        if len(checked.source):
            checked[len(checked.source) - 1]  # opens the last shard too, so a truncated file fails here
    except CorruptDatasetError:
        raise
    except Exception as error:
        raise checked.corrupt(None, error) from error
    return checked


class _CheckedSource:
    """A data source whose read errors (ArrayRecord/Riegeli checksum or format errors) name the damaged file."""

    def __init__(self, source, directory: str, split_info, fix: str):
        self.source, self.directory, self.fix = source, directory, fix
        self.filenames = [os.path.basename(str(path)) for path in split_info.filepaths]
        self.shard_starts = []
        start = 0
        for length in split_info.shard_lengths:
            self.shard_starts.append(start)
            start += length

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        # grain stores the source's repr in the iterator state and refuses a state whose repr differs, so this must
        # stay TFDS's own (also what checkpoints written before this wrapper existed hold).
        return repr(self.source)

    def __getitem__(self, index):
        try:
            return self.source[index]
        except (IndexError, KeyError):
            raise
        except Exception as error:
            raise self.corrupt(index, error) from error

    def __getitems__(self, indices):
        try:
            return self.source.__getitems__(indices)
        except Exception as error:
            for index in indices:  # find the record (hence the file) that fails
                self[index]
            raise self.corrupt(None, error) from error

    def corrupt(self, index, error: Exception) -> CorruptDatasetError:
        """The one-line error for a damaged file: which file (when the record index tells), what, and the fix."""
        import bisect

        if index is None or not self.filenames:
            where = self.directory
        else:
            where = os.path.join(
                self.directory, self.filenames[max(0, bisect.bisect_right(self.shard_starts, index) - 1)]
            )
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return CorruptDatasetError(f"{where} is damaged ({reason}); {self.fix}")
