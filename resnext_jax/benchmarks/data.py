"""Input pipeline benchmark: the ImageNet train transform, ours (grain + PIL) against torchvision's DataLoader.

    python -m resnext_jax.benchmarks.data [--num-images 256] [--repeats 3] [--workers 0 2]

Both pipelines decode the same in-memory JPEGs (made from scikit-learn's two sample photos, cropped and resized to
ImageNet-like sizes, so nothing is downloaded) and apply RandomResizedCrop(224), a horizontal flip and
normalization, batching 32. "workers 0" decodes in the main process; N > 0 uses N worker processes. Each
configuration runs `--repeats` times over the images twice; after one batch per worker (which pays for worker
start-up) the rest is timed, and the median images/s is printed. torch uses one intra-op thread per process so that
both sides use one core per worker. Ours runs TrainLoader's own operations and read options, twice: with
reduced-size JPEG decoding (the default) and with full decoding.
"""

import argparse
import io
import os
import statistics
import sys
import time

import numpy as np
from PIL import Image

BATCH_SIZE = 32


def make_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
    """Returns JPEGs between 300x225 and 500x500 px (ImageNet's typical range) cut from sklearn's sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    jpegs = []
    for index in range(num_images):
        photo = photos[index % 2]
        width, height = int(rng.integers(260, 640)), int(rng.integers(200, 427))
        left, top = int(rng.integers(0, 640 - width + 1)), int(rng.integers(0, 427 - height + 1))
        scale = rng.uniform(0.9, 1.3)
        crop = photo.crop((left, top, left + width, top + height))
        crop = crop.resize((min(500, int(width * scale)), min(500, int(height * scale))), Image.BILINEAR)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def time_ours(jpegs: list[bytes], workers: int, jpeg_draft: bool) -> float:
    """Images/s of the grain loader's ImageNet train transform over `jpegs` after the first batch."""
    import grain.python as grain

    from resnext_jax.data import datasets, loaders

    loaders.ensure_grain_flags()
    records = [{"image": data, "label": index % 1000} for index, data in enumerate(jpegs)]
    # The operations, read options and buffer size of TrainLoader with its defaults (prefetch=2).
    operations = loaders.train_operations(
        "imagenet", 224, None, BATCH_SIZE, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, jpeg_draft=jpeg_draft
    )
    loader = grain.DataLoader(
        data_source=records,
        sampler=grain.IndexSampler(len(records), shuffle=True, num_epochs=1, seed=0),
        operations=operations,
        worker_count=workers,
        worker_buffer_size=2,
        read_options=loaders.READ_OPTIONS,
    )
    return _time_batches(iter(loader), workers)


class _TorchJpegs:
    """A map-style torch dataset over the same in-memory JPEGs, decoded like torchvision's ImageFolder."""

    def __init__(self, jpegs, transform):
        self.jpegs, self.transform = jpegs, transform

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, index):
        image = Image.open(io.BytesIO(self.jpegs[index])).convert("RGB")
        return self.transform(image), index % 1000


def _one_thread(_):
    import torch

    torch.set_num_threads(1)


def time_torchvision(jpegs: list[bytes], workers: int) -> float:
    """Images/s of torch's DataLoader with torchvision's RandomResizedCrop+flip+ToTensor+Normalize."""
    import torch
    from torchvision import transforms

    from resnext_jax.data import datasets

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD),
        ]
    )
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        _TorchJpegs(jpegs, transform),
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        prefetch_factor=2 if workers else None,
    )
    return _time_batches(iter(loader), workers)


def _time_batches(iterator, workers: int) -> float:
    # Worker start-up is not throughput: wait until every worker has delivered a batch (both loaders hand out
    # batches round-robin), then time the rest.
    for _ in range(max(1, workers)):
        next(iterator)
    start = last = time.perf_counter()
    count = 0
    for batch in iterator:
        count += len(batch["label"]) if isinstance(batch, dict) else len(batch[1])
        last = time.perf_counter()  # stop the clock at the last batch: worker shutdown is not throughput either
    return count / (last - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1])
    args = parser.parse_args(argv)
    print("command: python -m resnext_jax.benchmarks.data " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"cpus: {os.cpu_count()}, images: {args.num_images}, batch: {BATCH_SIZE}, repeats: {args.repeats}")
    jpegs = make_jpegs(args.num_images) * 2  # two passes, so start-up is a small part of each run
    runners = {
        "torchvision DataLoader": lambda workers: time_torchvision(jpegs, workers),
        "ours (grain, draft JPEG)": lambda workers: time_ours(jpegs, workers, jpeg_draft=True),
        "ours (grain, full JPEG)": lambda workers: time_ours(jpegs, workers, jpeg_draft=False),
    }
    print(f"| workers | {' | '.join(runners)} | ratio draft/tv | ratio full/tv |")
    print("|---|" + "---|" * (len(runners) + 2))
    for workers in args.workers:
        medians = {name: statistics.median(run(workers) for _ in range(args.repeats)) for name, run in runners.items()}
        values = list(medians.values())
        cells = " | ".join(f"{value:.1f}" for value in values)
        print(f"| {workers} | {cells} | {values[1] / values[0]:.2f} | {values[2] / values[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
