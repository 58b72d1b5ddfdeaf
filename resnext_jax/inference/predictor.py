"""Top-k predictions for image files, in batches, with one result (or one error) per file, in order.

loaded = load_model("runs/quickstart")
for result in predict_files(loaded, ["photos/"]):
    print(result.path, result.error or result.top_k)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator

import jax
import numpy as np

from resnext_jax.inference import images as image_io
from resnext_jax.inference.loader import LoadedModel
from resnext_jax.ops import inference_compiler_options


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One file's outcome: `top_k` as (class index, class name, probability), best first, or an `error` line.

    `notes` name conversions that changed how the file was read (e.g. 16-bit to 8-bit).
    """

    path: str
    top_k: tuple[tuple[int, str, float], ...] = ()
    error: str | None = None
    notes: tuple[str, ...] = ()


def make_probabilities_fn(loaded: LoadedModel):
    """`fn(images) -> softmax probabilities` (float32 (B, classes)), jitted with the inference compiler options."""
    module = loaded.module

    def probabilities(variables, images):
        return jax.nn.softmax(module.apply(variables, images, train=False).astype(np.float32), axis=-1)

    platform = jax.devices()[0].platform
    jitted = jax.jit(probabilities, compiler_options=inference_compiler_options(platform))
    return lambda images: jitted(loaded.variables, images)


def _read(path: str, loaded: LoadedModel, max_pixels: int):
    pre = loaded.preprocessing
    try:
        image, notes = image_io.read_image(path, max_pixels=max_pixels, resize_size=pre.resize_size)
        return image_io.preprocess(image, pre.resize_size, pre.crop_size, pre.interpolation), tuple(notes), None
    except image_io.ImageReadError as error:
        return None, (), str(error)


def predict_files(
    loaded: LoadedModel,
    paths: list[str],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    max_pixels: int = image_io.DEFAULT_MAX_PIXELS,
    progress=None,
) -> Iterator[Prediction]:
    """Yields one `Prediction` per path, in order; a bad file yields its error and the rest go on.

    Files are decoded on a few threads (PIL releases the GIL) while the device runs the previous batch. Every
    batch is padded to the same size, so the model compiles once. `progress` (e.g. a tqdm bar) is advanced by
    one per file.
    """
    pre = loaded.preprocessing
    names = pre.class_names
    top_k = max(1, min(top_k, len(names)))
    batch_size = max(1, min(batch_size, len(paths)))
    probabilities = make_probabilities_fn(loaded)
    workers = min(4, os.cpu_count() or 1)
    chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:

        def submit(chunk):
            return [pool.submit(_read, path, loaded, max_pixels) for path in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            decoded = [future.result() for future in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []  # decode ahead of the device
            good = [pixels for pixels, _, error in decoded if error is None]
            probs = None
            if good:
                batch = np.zeros((batch_size, pre.crop_size, pre.crop_size, 3), np.uint8)
                batch[: len(good)] = np.stack(good)
                probs = np.asarray(probabilities(image_io.normalize(batch, pre.mean, pre.std)))
            row = 0
            for path, (_pixels, notes, error) in zip(chunk, decoded):
                if error is not None:
                    yield Prediction(path=path, error=error)
                else:
                    order = np.argsort(-probs[row], kind="stable")[:top_k]
                    yield Prediction(
                        path=path,
                        notes=notes,
                        top_k=tuple((int(label), names[label], float(probs[row, label])) for label in order),
                    )
                    row += 1
                if progress is not None:
                    progress.update(1)
