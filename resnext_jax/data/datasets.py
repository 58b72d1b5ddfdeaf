"""Dataset catalogue: which TFDS names we support, their metadata, and opening them as grain data sources.

Everything is read with `tfds.data_source` (ArrayRecord), which needs no TensorFlow. A dataset that is not prepared
fails here, before any loader is built, with a message that says what to download and where to put it.
"""

import dataclasses
import os

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a training run needs to know about a dataset.

  Attributes:
    name: the TFDS name, e.g. 'imagenette/320px-v2'.
    num_classes: number of labels.
    num_train: examples in `train_split`.
    num_eval: examples in `eval_split`.
    train_split: TFDS split used for training.
    eval_split: TFDS split used for evaluation.
    mean: per-channel RGB mean on the 0-1 scale, used to normalize images.
    std: per-channel RGB std on the 0-1 scale.
    image_size: the usual training resolution (32 for digits and CIFAR, 224 for ImageNet).
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


@dataclasses.dataclass(frozen=True)
class _Spec:
  num_classes: int
  eval_split: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  image_size: int
  how_to_prepare: str


_IMAGENETTE_HOWTO = (
    "Preparing imagenette downloads it from fast.ai and needs TensorFlow: `pip install -e '.[tf]'`, then "
    "`python -c \"from resnext_jax.data import prepare_dataset; prepare_dataset('{name}')\"` on a machine with "
    "network access, and copy {data_dir}/{name_dir} to the training machine."
)
_CIFAR_HOWTO = (
    "Preparing CIFAR downloads cifar-*-binary.tar.gz from www.cs.toronto.edu and needs TensorFlow: "
    "`pip install -e '.[tf]'`, then `python -c \"from resnext_jax.data import prepare_dataset; "
    "prepare_dataset('{name}')\"` on a machine with network access, and copy {data_dir}/{name_dir} here."
)
_IMAGENET_HOWTO = (
    "ImageNet cannot be downloaded automatically. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
    "from https://image-net.org/ into {data_dir}/downloads/manual/, install TensorFlow (`pip install -e '.[tf]'`) "
    "and run `python -c \"from resnext_jax.data import prepare_dataset; prepare_dataset('imagenet2012')\"`."
)
_DIGITS = _Spec(10, "test", (0.3057, 0.3057, 0.3057), (0.3234, 0.3234, 0.3234), 32,
                "digits builds offline from scikit-learn; this should not fail.")
_IMAGENETTE = _Spec(10, "validation", IMAGENET_MEAN, IMAGENET_STD, 224, _IMAGENETTE_HOWTO)

# Keys are TFDS names. 'imagenette' alone means TFDS's default config, full-size-v2.
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


def supported_datasets() -> list[str]:
  """Returns the TFDS names that `dataset_info` and the loaders accept."""
  return sorted(_SPECS)


def default_data_dir() -> str:
  """Returns $TFDS_DATA_DIR, or ~/tensorflow_datasets like TFDS itself."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset {name!r}; use one of {supported_datasets()}.")
  return _SPECS[name]


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds

  if name == "digits":
    import resnext_jax.data.digits  # noqa: F401  (registers the builder with TFDS)
  return tfds.builder(name, data_dir=data_dir, file_format="array_record")


def _not_prepared_error(name: str, data_dir: str, builder) -> FileNotFoundError:
  howto = _spec(name).how_to_prepare.format(
      name=name, data_dir=data_dir, name_dir=os.path.relpath(builder.data_dir, data_dir))
  return FileNotFoundError(f"Dataset {name!r} is not prepared in {builder.data_dir}. {howto}")


def prepare_dataset(name: str, data_dir: str | None = None) -> None:
  """Prepares `name` in `data_dir` as ArrayRecord files, if it is not there already.

  `digits` builds offline from scikit-learn. Other datasets are downloaded and prepared by TFDS, which needs
  network access and TensorFlow (`pip install -e '.[tf]'`); imagenet2012 also needs its manual download. Failures
  are re-raised with a message that says what to do.
  """
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as error:  # TFDS raises many types from deep inside; what the user needs is the fix.
    raise _not_prepared_error(name, data_dir, builder) from error


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Returns the DatasetInfo of `name`, building `digits` on first use.

  Raises:
    ValueError: `name` is not a supported dataset.
    FileNotFoundError: the dataset is not prepared (the message says how to prepare it), or it was prepared as
      TFRecord instead of ArrayRecord.
  """
  spec = _spec(name)
  data_dir = data_dir or default_data_dir()
  if name == "digits":
    prepare_dataset(name, data_dir)
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise _not_prepared_error(name, data_dir, builder)
  files = os.listdir(builder.data_dir)
  if not any(".array_record" in file for file in files):
    raise FileNotFoundError(
        f"{builder.data_dir} holds {name} as TFRecord, which needs TensorFlow to read. Prepare it again as "
        f"ArrayRecord: `builder.download_and_prepare(file_format='array_record')` or "
        f"`tfds build {name} --file_format=array_record`.")
  splits = builder.info.splits
  return DatasetInfo(
      name=name, num_classes=spec.num_classes, num_train=splits["train"].num_examples,
      num_eval=splits[spec.eval_split].num_examples, train_split="train", eval_split=spec.eval_split,
      mean=spec.mean, std=spec.std, image_size=spec.image_size)


def open_source(name: str, split: str, data_dir: str | None = None):
  """Returns a grain-compatible random-access source whose records are {'image': encoded bytes, 'label': int}.

  Images are left encoded so that the loader decodes them with PIL (and can decode JPEGs at reduced size).
  """
  import tensorflow_datasets as tfds

  data_dir = data_dir or default_data_dir()
  dataset_info(name, data_dir)  # fails fast with the fix if the dataset is missing
  if name == "digits":
    import resnext_jax.data.digits  # noqa: F401
  return tfds.data_source(name, split=split, data_dir=data_dir,
                          decoders={"image": tfds.decode.SkipDecoding()})
