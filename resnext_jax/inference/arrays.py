"""Predictions and features on images in memory: `LoadedModel.predict` and `LoadedModel.features`.

    loaded = resnext_jax.load_model("runs/quickstart")
    loaded.predict(array_hwc_uint8, top_k=3)     # [[('7', 0.98), ('1', 0.01), ('9', 0.004)]]
    loaded.features([pil_image, "cat.jpg"])      # {'stage1': (2, H/4, W/4, C1), ..., 'pre_logits': (2, C)}

Each image goes through the model's own eval preset (resize, center crop, normalization: `loaded.preprocessing`),
exactly as `predict_files` and the eval loader do, so an array gives what its file would. The forward pass is
jitted once per model and compiled once per batch shape: batches are padded to a fixed size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from resnext_jax.data import transforms as T
from resnext_jax.errors import InputError, UserError
from resnext_jax.inference import images as image_io

DEFAULT_BATCH = 64


def to_rgb_image(image, resize_size: int | None = None) -> Image.Image:
    """One image as an RGB PIL image: a path, a PIL image, or an HWC (or HW) array.

    uint8 arrays are pixels; float arrays hold values in 0..1 (as matplotlib and `ToTensor` use) and are rounded
    to 8 bits, the precision every file has. One channel becomes gray RGB, a fourth (alpha) is dropped.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            return image_io.read_image(path, resize_size=resize_size)[0]
        except image_io.ImageReadError as error:
            raise image_io.ImageReadError(f"{path}: {error}") from error
    if isinstance(image, Image.Image):
        return T.to_rgb(image)[0]
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or 0 in array.shape:
        raise InputError(
            f"an image array has shape {array.shape}; pass one image as (height, width, 3) (or (height, width)), "
            f"channels last, and several as a list or an (N, height, width, 3) array"
        )
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array).all()
        if not finite or array.min() < 0 or array.max() > 1:
            raise InputError(
                f"a float image array holds values in [{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]; float "
                f"images must be in 0..1 (divide by 255, or pass uint8 pixels)"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"an {array.dtype} image array holds values outside 0..255; pass uint8 pixels")
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array))


def _as_list(images) -> list:
    """A batch as a list: a list or tuple, an (N, H, W, C) array, or one image (a path, PIL image, HWC array)."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, Sequence):
        return list(images)
    array = np.asarray(images)
    return list(array) if array.ndim == 4 else [array]


def model_input(loaded, images) -> np.ndarray:
    """The images as the model's float32 NHWC input, through `loaded.preprocessing`."""
    pre = loaded.preprocessing
    pixels = [
        image_io.preprocess(to_rgb_image(image, pre.resize_size), pre.resize_size, pre.crop_size, pre.interpolation)
        for image in _as_list(images)
    ]
    if not pixels:
        raise InputError("no images given; pass an image or a list of images")
    return image_io.normalize(np.stack(pixels), pre.mean, pre.std)


def _jitted(loaded, kind: str):
    """The model's jitted forward pass (`kind`: 'probabilities' or 'features'), made once per LoadedModel."""
    cache = loaded.__dict__.setdefault("_jitted", {})  # a frozen dataclass: its __dict__ still takes a cache
    if kind not in cache:
        from resnext_jax.ops import inference_compiler_options

        module = loaded.module
        if kind == "probabilities":

            def forward(variables, batch):
                return jax.nn.softmax(module.apply(variables, batch, train=False).astype(np.float32), axis=-1)

        else:
            from resnext_jax.inference.from_artifact import ArtifactModule

            if isinstance(module, ArtifactModule):
                raise UserError(
                    f"features need the model's weights, and {loaded.source.get('path')} is an exported file that "
                    f"only gives logits; load the training workdir or the weights file instead"
                )

            def forward(variables, batch):
                out = module.apply(variables, batch, train=False, return_features=True)
                return {key: value.astype(np.float32) for key, value in out.items() if key != "logits"}

        options = inference_compiler_options(jax.devices()[0].platform)
        cache[kind] = jax.jit(forward, compiler_options=options)
    return cache[kind]


def _run(loaded, kind: str, inputs: np.ndarray, batch_size: int):
    """Runs `kind` over `inputs` in batches of one fixed size (the last one padded), so it compiles once."""
    forward = _jitted(loaded, kind)
    size = max(1, min(batch_size, len(inputs)))
    outputs = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start : start + size]
        padded = np.zeros((size, *inputs.shape[1:]), inputs.dtype)
        padded[: len(chunk)] = chunk
        count = len(chunk)
        result = forward(loaded.variables, padded)
        outputs.append(jax.tree.map(lambda value, count=count: np.asarray(value)[:count], result))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def predict(loaded, images, top_k: int = 5, batch_size: int = DEFAULT_BATCH) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) pairs, best first, for each image (see `LoadedModel.predict`)."""
    names = loaded.preprocessing.class_names
    top_k = max(1, min(int(top_k), len(names)))
    probabilities = _run(loaded, "probabilities", model_input(loaded, images), batch_size)
    results = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:top_k]
        results.append([(names[label], float(row[label])) for label in order])
    return results


def features(loaded, images, batch_size: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:
    """The stage features of each image (see `LoadedModel.features`)."""
    return _run(loaded, "features", model_input(loaded, images), batch_size)
