"""Input pipelines: TFDS ArrayRecord sources read with grain, torchvision-identical transforms, Mixup/CutMix.

    python -m resnext_jax.data.prepare folder ~/photos --name my_photos   # your own images, no TensorFlow needed

    from resnext_jax.data import dataset_info, create_train_loader, create_eval_loader
    info = dataset_info("digits")                  # built offline into $TFDS_DATA_DIR on first use
    train = iter(create_train_loader("digits", batch_size=64, image_size=32, transform="cifar"))
    batch = next(train)                            # {'image': float32 (64, 32, 32, 3), 'label': int32 (64,)}
    state = train.get_state()                      # JSON bytes; train.set_state(state) resumes exactly

See docs/data.md.
"""

from resnext_jax.data.datasets import (
    CorruptDatasetError,
    DatasetInfo,
    DatasetNotFoundError,
    UnknownDatasetError,
    dataset_info,
    default_data_dir,
    prepare_dataset,
    supported_datasets,
)
from resnext_jax.data.loaders import EvalLoader, TrainLoader, bad_image_count


def create_train_loader(
    name: str,
    *,
    data_dir: str | None = None,
    batch_size: int,
    image_size: int,
    transform: str = "imagenet",
    augment: str | None = None,
    mean=None,
    std=None,
    seed: int = 0,
    num_epochs: int | None = None,
    worker_count: int = 0,
    prefetch: int = 2,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainLoader:
    """Returns a loader of shuffled, augmented training batches for this process.

    Args:
      name: a name from `supported_datasets()`, or a folder dataset made with `python -m resnext_jax.data.prepare`.
      data_dir: TFDS data directory; default $TFDS_DATA_DIR or ~/tensorflow_datasets.
      batch_size: examples per batch in this process (the global batch is batch_size * process_count).
      image_size: output height and width.
      transform: "imagenet" (RandomResizedCrop 0.08-1, 3/4-4/3, then flip), "cifar" (pad 4, random crop, flip),
        "resize_crop" (random shorter side in [size, 1.35 size], random crop, flip) or "none" (resize only).
      augment: None, "randaugment" (torchvision defaults, 2 ops, magnitude 9) or "autoaugment" (ImageNet policy).
      mean: RGB mean on the 0-1 scale; default the dataset's.
      std: RGB std on the 0-1 scale; default the dataset's.
      seed: shuffling and augmentation seed; use the same one on every process.
      num_epochs: None repeats forever.
      worker_count: decoding processes; 0 decodes in the calling process.
      prefetch: batches each worker keeps ready.
      process_index: this process, e.g. jax.process_index().
      process_count: all processes, e.g. jax.process_count(); each reads its rows of every global batch.

    Returns:
      A TrainLoader. `iter(loader)` yields {'image': float32 (B, H, W, 3) normalized NHWC, 'label': int32 (B,)}
      and has seek(step), get_state() -> JSON bytes and set_state(bytes): the position is the global step, the same
      on any number of processes (`resnext_jax.data.train_order`); each epoch's last partial global batch is dropped.
    """
    return TrainLoader(
        name,
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=image_size,
        transform=transform,
        augment=augment,
        mean=mean,
        std=std,
        seed=seed,
        num_epochs=num_epochs,
        worker_count=worker_count,
        prefetch=prefetch,
        process_index=process_index,
        process_count=process_count,
    )


def create_eval_loader(
    name: str,
    *,
    data_dir: str | None = None,
    batch_size: int,
    image_size: int,
    resize_size: int | None = None,
    mean=None,
    std=None,
    worker_count: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    interpolation: str = "bilinear",
) -> EvalLoader:
    """Returns a loader for one padded, masked pass over the eval split in this process.

    Images are resized (shorter side to `resize_size`, bilinear with antialias, or `interpolation="bicubic"` as
    timm's presets do) and center-cropped to `image_size`, like torchvision's ImageClassification preset:
    resize_size=256 for V1 weights, 232 for V2.
    resize_size=None means image_size (no crop margin), which suits 32x32 datasets.

    Returns:
      An EvalLoader of `len(loader)` batches of {'image': float32 (B, S, S, 3), 'label': int32 (B,),
      'mask': bool (B,)}. Every process yields the same number of batches; over all processes each eval example
      appears exactly once with mask True.
    """
    return EvalLoader(
        name,
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=image_size,
        resize_size=resize_size,
        mean=mean,
        std=std,
        worker_count=worker_count,
        process_index=process_index,
        process_count=process_count,
        interpolation=interpolation,
    )


def mixup_cutmix(*args, **kwargs):
    """Mixup/CutMix on device; see `resnext_jax.data.mixup.mixup_cutmix` (imported lazily to keep jax optional here)."""
    from resnext_jax.data.mixup import mixup_cutmix as impl

    return impl(*args, **kwargs)


__all__ = [
    "CorruptDatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "EvalLoader",
    "TrainLoader",
    "UnknownDatasetError",
    "bad_image_count",
    "create_eval_loader",
    "create_train_loader",
    "dataset_info",
    "default_data_dir",
    "mixup_cutmix",
    "prepare_dataset",
    "supported_datasets",
]
