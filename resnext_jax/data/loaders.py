"""grain loaders for training and evaluation over TFDS ArrayRecord sources.

The training loader reads one seeded permutation of the split per epoch; each process takes its rows of every global
batch (`train_order`), so the position is a function of the global step and a run resumes on any number of
processes. It decodes and augments in optional worker processes, and its iterator state is a small JSON record
(the step, epoch, seed and rows) that restores the exact batch stream. The eval loader pads every process to the
same number of batches and masks the padding, so every eval example counts exactly once.
"""

import logging
import math
import threading

import grain.python as grain
import numpy as np
from PIL import Image

from resnext_jax.data import autoaugment, datasets, train_order
from resnext_jax.data import transforms as T

TRAIN_TRANSFORMS = ("imagenet", "cifar", "resize_crop", "none")
AUGMENTS = (None, "randaugment", "autoaugment")
# Threads that read records ahead of the transforms (in each worker process when worker_count > 0). Two hide
# ArrayRecord read latency; grain's default of 16 only adds GIL hand-offs (290 us of overhead per record in
# process against 140 us with 2, see docs/benchmarks-history.md "Input pipeline").
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)

_bad_images = 0
_bad_images_lock = threading.Lock()  # grain reads with a thread pool when worker_count is 0


def bad_image_count() -> int:
    """Returns how many undecodable images this process has skipped (train) or masked out (eval) so far.

    Worker processes keep their own counts; each bad image is also logged as a warning with the running count.
    """
    return _bad_images


def _count_bad_image(error: Exception) -> None:
    global _bad_images
    with _bad_images_lock:
        _bad_images += 1
        count = _bad_images
    logging.warning("Skipping bad image #%d in this process: %s", count, error)


def ensure_grain_flags() -> None:
    """Marks absl flags as parsed when no absl app did, which grain's worker processes require.

    Without it, worker_count > 0 in a plain script fails with "Trying to access flag
    --grain_enable_multiprocess_worker_profiling before flags were parsed". Under `absl.app.run` it does nothing.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _TrainTransform(grain.RandomMapTransform):
    """Decodes one record and augments it; returns None (dropped later) for an image that cannot be decoded."""

    def __init__(self, transform: str, image_size: int, augment: str | None, jpeg_draft: bool = True):
        self.transform, self.image_size, self.augment = transform, image_size, augment
        self.jpeg_draft = jpeg_draft  # decode JPEGs at reduced scale when the crop allows (see random_resized_crop)

    def random_map(self, record, rng: np.random.Generator):
        try:
            image = self._augment(record["image"], rng)
        except Exception as error:  # A bad file must not end the epoch; it is counted and logged instead.
            _count_bad_image(error)
            return None
        return {"image": image, "label": np.int32(record["label"])}

    def _augment(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        if self.transform == "imagenet":
            image = T.random_resized_crop(T.open_image(data), rng, size, data=data, jpeg_draft=self.jpeg_draft)
        elif self.transform == "resize_crop":
            image = T.random_resize_then_crop(T.decode_image(data), rng, size)
        elif self.transform == "cifar":
            array = T.resize_to(T.decode_image(data), size)
            image = Image.fromarray(T.pad_crop_flip(array, rng))
        else:  # "none"
            return T.resize_to(T.decode_image(data), size)
        if self.transform != "cifar" and rng.random() < 0.5:
            # PIL's transpose (25 us at 224x224) beats a numpy [:, ::-1] view, whose strided copy in the batch
            # costs 180.
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.augment == "randaugment":
            image = autoaugment.rand_augment(image, rng)
        elif self.augment == "autoaugment":
            image = autoaugment.auto_augment_imagenet(image, rng)
        return np.asarray(image)


class _DropBad(grain.FilterTransform):
    def filter(self, element) -> bool:
        return element is not None


class _Normalize(grain.MapTransform):
    """Turns a uint8 batch into normalized float32 once per batch, which is cheaper than per image."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)

    def map(self, batch):
        return {**batch, "image": T.normalize(batch["image"], self.mean, self.std)}


def train_operations(
    transform: str, image_size: int, augment: str | None, batch_size: int, mean, std, jpeg_draft: bool = True
) -> list:
    """Returns the grain operations from an encoded record to a normalized float32 (B, H, W, 3) batch.

    `TrainLoader` and the input pipeline benchmark both use this, so the benchmark times what training runs.
    """
    return [
        _TrainTransform(transform, image_size, augment, jpeg_draft=jpeg_draft),
        _DropBad(),
        grain.Batch(batch_size, drop_remainder=True),
        _Normalize(mean, std),
    ]


class TrainLoader:
    """An endless (or `num_epochs`-long) stream of shuffled, augmented training batches for one process.

    `iter(loader)` returns a `train_order.StepIterator`. Its position is the global step: after a restart, build the
    loader (on any number of processes whose batches add up to the same global batch), call `iterator =
    iter(loader)` and `iterator.seek(step)` (or `set_state` with a saved `get_state()`), and the global batches are
    exactly those the interrupted run would have seen next (augmentation randomness is seeded per example and
    epoch).
    """

    def __init__(
        self,
        name,
        *,
        data_dir,
        batch_size,
        image_size,
        transform,
        augment,
        mean,
        std,
        seed,
        num_epochs,
        worker_count,
        prefetch,
        process_index,
        process_count,
    ):
        if transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"transform={transform!r}; use one of {TRAIN_TRANSFORMS}.")
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r}; use one of {AUGMENTS}.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
        info = datasets.dataset_info(name, data_dir)
        source = datasets.open_source(name, info.train_split, data_dir)
        global_batch = batch_size * process_count
        if len(source) < global_batch:
            raise ValueError(
                f"{name} has {len(source)} training examples, fewer than the global batch {global_batch} "
                f"({process_count} processes x {batch_size}); lower the batch size."
            )
        self.info = info
        self.batch_size = batch_size
        self.steps_per_epoch = len(source) // global_batch
        self._num_steps = None if num_epochs is None else int(num_epochs * self.steps_per_epoch)
        self._source, self._seed = source, seed
        self._process_index, self._process_count = process_index, process_count
        self._operations = train_operations(
            transform,
            image_size,
            augment,
            batch_size,
            info.mean if mean is None else mean,
            info.std if std is None else std,
        )
        if worker_count:
            ensure_grain_flags()
        self._worker_count, self._prefetch = worker_count, prefetch

    def _loader_from(self, step: int) -> grain.DataLoader:
        """A grain loader of this process's batches from global step `step` on (see `train_order`)."""
        sampler = train_order.EpochOrderSampler(
            len(self._source),
            self.batch_size * self._process_count,
            self.batch_size,
            self._process_index * self.batch_size,
            self._seed,
            step,
            self._num_steps,
            self._worker_count,
        )
        return grain.DataLoader(
            data_source=self._source,
            sampler=sampler,
            operations=self._operations,
            shard_options=grain.NoSharding(),  # the sampler already gives this process's rows
            worker_count=self._worker_count,
            worker_buffer_size=max(1, self._prefetch),
            read_options=READ_OPTIONS,
        )

    def __iter__(self) -> train_order.StepIterator:
        return train_order.StepIterator(
            self._loader_from,
            process_index=self._process_index,
            process_count=self._process_count,
            local_batch=self.batch_size,
            seed=self._seed,
            steps_per_epoch=self.steps_per_epoch,
        )


class PaddedEvalSource:
    """This process's slice of the eval split, padded with empty records to a whole number of batches."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, position: int):
        index = int(self._indices[position])
        if index < 0:
            return {"image": None, "label": 0, "mask": False}
        record = self._source[index]
        return {"image": record["image"], "label": record["label"], "mask": True}


class _EvalTransform(grain.MapTransform):
    """Decodes one record and applies the eval preset; an undecodable image becomes zeros with mask False."""

    def __init__(self, resize_size: int, image_size: int, interpolation: str = "bilinear"):
        T.resample_filter(interpolation)  # a bad name fails here, once, not as every image masked out as bad
        self.resize_size, self.image_size, self.interpolation = resize_size, image_size, interpolation

    def map(self, record):
        mask = record["mask"]
        image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        if mask:
            try:
                image = T.eval_transform(
                    T.decode_image(record["image"]), self.resize_size, self.image_size, self.interpolation
                )
            except Exception as error:  # An undecodable eval image is masked out (and counted), never fatal.
                _count_bad_image(error)
                mask = False
        return {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(mask)}


def eval_shard_indices(num_examples: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Returns this process's eval example indices, padded with -1 to `num_batches * batch_size`.

    Processes take consecutive blocks of ceil(num_examples / process_count) examples, and all of them are padded to
    the same number of batches so that collectives in the eval step line up.
    """
    per_process = math.ceil(num_examples / process_count)
    num_batches = math.ceil(per_process / batch_size)
    start = min(num_examples, process_index * per_process)
    stop = min(num_examples, start + per_process)
    indices = np.full(num_batches * batch_size, -1, np.int64)
    indices[: stop - start] = np.arange(start, stop)
    return indices


class EvalLoader:
    """One pass over the eval split for one process: batches of {'image', 'label', 'mask'}.

    Every process yields `num_batches` batches; examples with mask False are padding (or undecodable images) and
    must be left out of metrics. Over all processes, every eval example appears exactly once with mask True.
    `interpolation` is the resize filter: "bilinear" (torchvision's presets; what training evaluates with) or
    "bicubic" (timm's, for the presets of most timm weights).
    """

    def __init__(
        self,
        name,
        *,
        data_dir,
        batch_size,
        image_size,
        resize_size,
        mean,
        std,
        worker_count,
        process_index,
        process_count,
        interpolation: str = "bilinear",
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
        info = datasets.dataset_info(name, data_dir)
        source = datasets.open_source(name, info.eval_split, data_dir)
        self.info = info
        indices = eval_shard_indices(len(source), batch_size, process_index, process_count)
        self.num_batches = len(indices) // batch_size
        self._batch_size = batch_size
        self._source = PaddedEvalSource(source, indices)
        self._operations = [
            _EvalTransform(resize_size or image_size, image_size, interpolation),
            grain.Batch(batch_size, drop_remainder=False),
            _Normalize(info.mean if mean is None else mean, info.std if std is None else std),
        ]
        self._worker_count = worker_count

    def __len__(self) -> int:
        return self.num_batches

    def read_from(self, source, indices: np.ndarray) -> None:
        """Reads `source` at `indices` (-1: a padding record, masked out) instead of this process's slice of the
        eval split; the batch size, the preprocessing and the masking stay (another split, a calibration sample)."""
        if len(indices) % self._batch_size:
            raise ValueError(f"{len(indices)} indices are not whole batches of {self._batch_size}; pad them with -1")
        self._source = PaddedEvalSource(source, indices)
        self.num_batches = len(indices) // self._batch_size

    def __iter__(self):
        if self._worker_count:
            ensure_grain_flags()
        sampler = grain.IndexSampler(len(self._source), shuffle=False, num_epochs=1, seed=0)
        loader = grain.DataLoader(
            data_source=self._source,
            sampler=sampler,
            operations=self._operations,
            shard_options=grain.NoSharding(),  # the sampler already gives this process's rows
            worker_count=self._worker_count,
            read_options=READ_OPTIONS,
        )
        return iter(loader)
