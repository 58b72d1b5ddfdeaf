"""The measurements behind an evaluation report: accuracy with per-class counts, speed, peak memory.

Accuracy runs the same padded, masked `create_eval_loader` pass (with the model's interpolation: a timm weight's
bicubic) and the same shard_map over all local devices as the training loop's eval step (same compiler options,
same model with the BatchNorm axis name), but returns each example's prediction instead of sums, so the confusion
matrix can be counted on the host. Its top-1 therefore equals the training log's top-1 for the same checkpoint
exactly.

Speed is measured separately on one device with random input: compile time apart, then per-batch latencies.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from resnext_jax import parallel
from resnext_jax.errors import UserError
from resnext_jax.inference.calibration import calibration, confidence
from resnext_jax.inference.loader import LoadedModel
from resnext_jax.ops import inference_compiler_options
from resnext_jax.parallel import AXIS


def parse_dataset(spec: str) -> tuple[str, str | None]:
    """'cifar10:test' -> ('cifar10', 'test'); 'digits' -> ('digits', None), meaning the eval split."""
    name, _, split = spec.partition(":")
    return name, split or None


def eval_loader(
    loaded: LoadedModel, dataset: str, split: str | None = None, data_dir: str | None = None, batch_size: int = 64
):
    """The padded, masked eval pass over `dataset` (its eval split, or `split`) with the model's whole preset:
    sizes, mean and std, and its interpolation (a timm weight's bicubic; bilinear for torchvision and training
    runs), so its pixels are the ones `predict` feeds the model and the ones its weights were evaluated with."""
    from resnext_jax.data import create_eval_loader

    pre = loaded.preprocessing
    try:
        loader = create_eval_loader(
            dataset,
            data_dir=data_dir,
            batch_size=batch_size,
            image_size=pre.crop_size,
            resize_size=pre.resize_size,
            mean=pre.mean,
            std=pre.std,
            worker_count=0,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            interpolation=pre.interpolation,
        )
    except (FileNotFoundError, ValueError) as error:  # unknown or unprepared dataset: the message says what to do
        raise UserError(str(error)) from error
    _refuse_changed_labels(loaded, dataset, loader.info)
    if split and split != loader.info.eval_split:
        _use_split(loader, dataset, split, data_dir, batch_size)
    return loader


def _refuse_changed_labels(loaded: LoadedModel, dataset: str, info) -> None:
    """A run's dataset whose classes changed since it trained (`load_model` notes that in `source`): its labels
    no longer mean the model's outputs, so scoring against them would be silently wrong."""
    changed = loaded.source.get("dataset_changed")
    if not changed or dataset != (loaded.config or {}).get("dataset") or not info.class_names:
        return
    if tuple(info.class_names) != tuple(loaded.preprocessing.class_names):
        raise UserError(
            f"{changed}; its labels no longer match the model's classes, so evaluating on it would score "
            f"against the wrong labels. Restore the data the run trained on, or evaluate with another --dataset"
        )


def _use_split(loader, dataset: str, split: str, data_dir: str | None, batch_size: int) -> None:
    """Points an EvalLoader at another split. `create_eval_loader` reads only the eval split; this swaps in the
    same padded source over `split` (its padding and masking unchanged)."""
    from resnext_jax.data import datasets, loaders

    try:
        source = datasets.open_source(dataset, split, data_dir)
    except (KeyError, ValueError) as error:
        raise UserError(
            f"{dataset} has no split {split!r} ({error}); use e.g. {dataset}:train or "
            f"{dataset}:{loader.info.eval_split}"
        ) from error
    indices = loaders.eval_shard_indices(len(source), batch_size, jax.process_index(), jax.process_count())
    loader.read_from(source, indices)


def sample_loader(
    loaded: LoadedModel,
    dataset: str,
    split: str | None,
    data_dir: str | None,
    batch_size: int,
    count: int,
    seed: int = 0,
):
    """`eval_loader`'s pass (the model's own eval preprocessing) over `count` examples of `split` (default: the
    dataset's training split) drawn at random without replacement, in index order (int8 calibration)."""
    from resnext_jax.data import datasets

    loader = eval_loader(loaded, dataset, None, data_dir, batch_size)
    split = split or loader.info.train_split
    try:
        source = datasets.open_source(dataset, split, data_dir)
    except (KeyError, ValueError) as error:
        raise UserError(f"{dataset} has no split {split!r} ({error}); use e.g. {dataset}:train") from error
    chosen = np.sort(np.random.default_rng(seed).choice(len(source), min(count, len(source)), replace=False))
    indices = np.full(math.ceil(len(chosen) / batch_size) * batch_size, -1, np.int64)
    indices[: len(chosen)] = chosen
    loader.read_from(source, indices)
    return loader, split


def make_predict_step(loaded: LoadedModel, mesh):
    """`step(variables, batch) -> per-example {'pred', 'top5', 'loss', 'confidence'}` over the mesh, as the training
    loop's `make_eval_step` computes them (argmax for top-1, lax.top_k for top-5, cross-entropy on the logits), and
    the top softmax probability for calibration."""
    module = loaded.module.clone(bn_axis_name=AXIS)  # the model the training loop evaluated

    def step(variables, batch):
        logits = module.apply(variables, batch["image"], train=False)
        labels = batch["label"]
        top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], axis=-1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"pred": jnp.argmax(logits, -1), "top5": top5, "loss": loss, "confidence": confidence(logits)}

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False)
    return jax.jit(sharded, compiler_options=inference_compiler_options(mesh.devices.flat[0].platform))


def evaluate_accuracy(
    loaded: LoadedModel,
    dataset: str,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Top-1, top-5, loss and the confusion matrix over every example of the split, exactly once.

    Returns {'dataset', 'split', 'count', 'top1', 'top5', 'loss', 'correct', 'correct_top5', 'batch_size',
    'devices', 'seconds', 'confusion' (int64 (classes, classes), rows true, columns predicted), 'calibration'
    (`inference.calibration.calibration`: ECE and its bins)}.
    """
    if jax.process_count() > 1:
        raise UserError("evaluate runs in one process (over all of its local devices); run it on one host")
    mesh = parallel.create_mesh()
    if batch_size is None:
        batch_size = int((loaded.config or {}).get("eval_batch_size") or 64)
        batch_size = max(mesh.size, batch_size // mesh.size * mesh.size)
    try:
        local_batch = parallel.check_batch_size(batch_size, mesh.size, "batch_size")
    except ValueError as error:
        raise UserError(str(error)) from error
    loader = eval_loader(loaded, dataset, split, data_dir, local_batch)
    num_classes = len(loaded.preprocessing.class_names)
    if loader.info.num_classes != num_classes:
        raise UserError(
            f"{dataset} has {loader.info.num_classes} classes but the model has {num_classes} outputs; "
            f"evaluate it on the dataset it was trained for"
        )
    step = make_predict_step(loaded, mesh)
    variables = jax.device_put(loaded.variables, parallel.replicated(mesh))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    correct_top5, loss_sum, confidences, hits = 0, 0.0, [], []
    start = time.perf_counter()
    outputs = []  # fetched at the end, so the device runs while the host decodes the next batch
    for batch in loader:
        outputs.append((step(variables, parallel.global_batch(batch, mesh)), batch["label"], batch["mask"]))
    for out, labels, mask in outputs:
        out = jax.device_get(out)
        labels, mask = np.asarray(labels), np.asarray(mask)
        pred, top5, loss = (np.asarray(out[key]) for key in ("pred", "top5", "loss"))
        np.add.at(confusion, (labels[mask], pred[mask]), 1)
        correct_top5 += int(top5[mask].sum())
        loss_sum += float(loss[mask].astype(np.float64).sum())
        confidences.append(np.asarray(out["confidence"])[mask])
        hits.append(pred[mask] == labels[mask])
    seconds = time.perf_counter() - start
    count = int(confusion.sum())
    correct = int(np.trace(confusion))
    return {
        "dataset": dataset,
        "split": split or loader.info.eval_split,
        "count": count,
        "top1": correct / max(count, 1),
        "top5": correct_top5 / max(count, 1),
        "loss": loss_sum / max(count, 1),
        "correct": correct,
        "correct_top5": correct_top5,
        "batch_size": batch_size,
        "devices": mesh.size,
        "seconds": seconds,
        "confusion": confusion,
        "calibration": calibration(np.concatenate(confidences or [[]]), np.concatenate(hits or [[]])),
    }


def per_class(confusion: np.ndarray, names: tuple[str, ...]) -> list[dict]:
    """One row per class: examples, correct, accuracy (None without examples) and the most frequent wrong
    prediction with its count."""
    rows = []
    for label, row in enumerate(confusion):
        wrong = row.copy()
        wrong[label] = 0
        confused = int(np.argmax(wrong)) if wrong.any() else None
        count = int(row.sum())
        rows.append(
            {
                "class": label,
                "name": names[label],
                "count": count,
                "correct": int(row[label]),
                "accuracy": int(row[label]) / count if count else None,
                "most_confused_with": None if confused is None else names[confused],
                "confused_count": int(wrong.max()) if confused is not None else 0,
            }
        )
    return rows


def native_kernel_targets(lowered_text: str) -> list[str]:
    """The resnext-jax native CPU kernels a lowered program calls (its `custom_call` targets, without the build
    hash that each registered name ends in)."""
    return sorted({re.sub(r"_[0-9a-f]{16}$", "", name) for name in re.findall(r"resnext_jax_\w+", lowered_text)})


def measure_speed(
    loaded: LoadedModel, batch_sizes, *, min_seconds: float = 2.0, min_iterations: int = 5, seed: int = 0
) -> dict:
    """Forward-pass speed on one device at each batch size: compile seconds, then latencies of repeated runs.

    Each batch size is lowered and compiled once (timed apart), run twice untimed, then timed call by call
    (each waits for its result) until both `min_seconds` and `min_iterations` are reached. Input is random
    normal data at the preset's crop size: speed does not depend on the pixels.
    """
    device = jax.devices()[0]
    crop = loaded.preprocessing.crop_size
    module = loaded.module
    forward = jax.jit(
        lambda variables, images: module.apply(variables, images, train=False),
        compiler_options=inference_compiler_options(device.platform),
    )
    variables = jax.device_put(loaded.variables, device)
    runs, targets = [], set()
    for batch_size in batch_sizes:
        images = jax.device_put(jax.random.normal(jax.random.key(seed), (batch_size, crop, crop, 3)), device)
        start = time.perf_counter()
        lowered = forward.lower(variables, images)
        compiled = lowered.compile()
        compile_seconds = time.perf_counter() - start
        targets.update(native_kernel_targets(lowered.as_text()))
        for _ in range(2):
            compiled(variables, images).block_until_ready()
        latencies, begin = [], time.perf_counter()
        while len(latencies) < min_iterations or time.perf_counter() - begin < min_seconds:
            tick = time.perf_counter()
            compiled(variables, images).block_until_ready()
            latencies.append(time.perf_counter() - tick)
        latencies = np.asarray(latencies)
        runs.append(
            {
                "batch_size": int(batch_size),
                "compile_s": round(compile_seconds, 3),
                "iterations": len(latencies),
                "latency_ms_p50": round(float(np.percentile(latencies, 50)) * 1e3, 3),
                "latency_ms_p95": round(float(np.percentile(latencies, 95)) * 1e3, 3),
                "latency_ms_mean": round(float(latencies.mean()) * 1e3, 3),
                "images_per_s": round(batch_size * len(latencies) / float(latencies.sum()), 2),
            }
        )
    return {
        "device": str(device),
        "platform": device.platform,
        "dtype": str(jnp.dtype(module.dtype)),
        "resolution": crop,
        "runs": runs,
        "native_kernel_targets": sorted(targets),
    }


def peak_memory() -> dict:
    """The device's peak bytes in use where the backend reports it (GPU, TPU), else this process's peak RSS."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("peak_bytes_in_use"):
        return {
            "kind": "device",
            "device": str(device),
            "peak_bytes": int(stats["peak_bytes_in_use"]),
            "bytes_limit": int(stats.get("bytes_limit", 0)) or None,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"kind": "host_rss", "device": str(device), "peak_bytes": int(rss * scale), "bytes_limit": None}


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    if count < 1024:
        return f"{count} B"
    exponent = min(int(math.log(count, 1024)), 4)
    return f"{count / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exponent]}"
