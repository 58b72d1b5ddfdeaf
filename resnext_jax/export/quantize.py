"""int8 ONNX: onnxruntime's static quantization (QDQ, per-channel int8 weights, uint8 activations), calibrated on
images through the model's own eval preprocessing, and measured: float32 and int8 top-1 on the eval split of the
calibration dataset, through the same `evaluate_accuracy` that `python -m resnext_jax.evaluate` runs on the file.

Calibration runs the float graph on `calibration_images` images drawn at random (fixed seed) from the dataset's
training split (or the split named), and records each activation's min and max (`CalibrationMethod.MinMax`):
each tensor's scale maps that range onto uint8. Weights get one scale per output channel. The file is refused
when int8 loses more than `max_drop` top-1 points.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from resnext_jax.errors import UserError
from resnext_jax.export import common


def artifact_model(loaded, run, *, resolution: int, with_preprocessing: bool):
    """A `LoadedModel` that runs `run` (an ONNX session's images -> logits) with `loaded`'s preprocessing at
    `resolution`: what `load_model` gives for the written file."""
    from resnext_jax.inference.from_artifact import ArtifactModule

    pre = common.scaled_preprocessing(loaded.preprocessing, resolution)
    module = ArtifactModule(
        run=run,
        exported=None,
        batch=None,
        num_classes=len(pre.class_names),
        inside=with_preprocessing,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
    )
    return dataclasses.replace(loaded, module=module, variables={}, preprocessing=pre, config=None)


def _trained_image_size(loaded, calibration_set: str, image_size: int) -> tuple[int | None, str]:
    """The image size a calibration set's must equal, with words for the message: that of the dataset the run was
    trained on, when it is another one (and readable here); for weights with no run (torchvision, timm), the model's
    input size when the set is more than 4x off it (digits for an ImageNet model); else None."""
    from resnext_jax.data import dataset_info

    config = loaded.config or {}
    trained_on, crop = config.get("dataset"), loaded.preprocessing.crop_size
    if trained_on and trained_on != calibration_set:
        try:
            size = dataset_info(trained_on, config.get("data_dir") or None).image_size
        except Exception:  # noqa: BLE001  not prepared on this machine: the class check still applies
            return None, ""
        return size, f"the {trained_on} images the model was trained on hold {size}"
    if not trained_on and not 0.25 <= image_size / crop <= 4:
        return crop, f"the model takes {crop}"
    return None, ""


def _calibration_batches(loaded, calibrate: str, count: int, data_dir, with_preprocessing: bool) -> tuple:
    """(list of input batches for the file, the split used), checked against the model's classes and size."""
    from resnext_jax.inference import evaluation

    name, split = evaluation.parse_dataset(calibrate)
    loader, split = evaluation.sample_loader(loaded, name, split, data_dir, 32, count)
    info, pre = loader.info, loaded.preprocessing
    if info.num_classes != len(pre.class_names) or (
        info.class_names and tuple(info.class_names) != tuple(pre.class_names)
    ):
        raise UserError(
            f"calibration set {name} has {info.num_classes} classes, other than the model's "
            f"{len(pre.class_names)} ({', '.join(pre.class_names[:3])}, ...); calibrate on the dataset it was "
            f"trained on"
        )
    reference, what = _trained_image_size(loaded, name, info.image_size)
    if reference is not None and info.image_size != reference:
        raise UserError(
            f"calibration set {name} holds {info.image_size}-pixel images, {what}; calibrate on "
            f"images like the ones it serves (the dataset it was trained on)"
        )
    batches = []
    scale, offset = 255 * np.asarray(pre.std, np.float32), 255 * np.asarray(pre.mean, np.float32)
    for batch in loader:
        images = np.asarray(batch["image"], np.float32)[np.asarray(batch["mask"])]
        if with_preprocessing:
            images = np.clip(np.round(images * scale + offset), 0, 255).astype(np.uint8)
        if len(images):
            batches.append(images)
    return batches, name, split


def quantize_bytes(data: bytes, batches: list) -> bytes:
    """The int8 QDQ file (per-channel int8 weights, uint8 activations, MinMax ranges) of the float32 ONNX `data`,
    calibrated on `batches` (each a (B, R, R, 3) array the file takes)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return {"images": batch} if (batch := next(self.batches, None)) is not None else None

    with tempfile.TemporaryDirectory() as directory:
        paths = {key: os.path.join(directory, f"{key}.onnx") for key in ("float", "prepared", "int8")}
        with open(paths["float"], "wb") as f:
            f.write(data)
        quant_pre_process(paths["float"], paths["prepared"], skip_symbolic_shape=True)
        quantize_static(
            paths["prepared"],
            paths["int8"],
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        with open(paths["int8"], "rb") as f:
            return f.read()


def quantize_int8(
    loaded,
    data: bytes,
    *,
    calibrate: str | None,
    calibration_images: int,
    max_drop: float,
    resolution: int,
    with_preprocessing: bool,
    data_dir: str | None,
) -> tuple[bytes, dict]:
    """The int8 file of the float32 ONNX `data`, and the sidecar's {'int8': {...}} fields. Raises `UserError` when
    its top-1 on the eval split is more than `max_drop` points below the float file's."""
    from resnext_jax.export.onnx_export import session
    from resnext_jax.inference import evaluation

    if not calibrate:
        raise UserError("--quantize int8 needs --calibrate NAME[:split], the images to calibrate on")
    data_dir = data_dir or (loaded.config or {}).get("data_dir") or None
    at_size = common.scaled_preprocessing(loaded.preprocessing, resolution)
    sized = dataclasses.replace(loaded, preprocessing=at_size)
    batches, name, split = _calibration_batches(sized, calibrate, calibration_images, data_dir, with_preprocessing)

    quantized = quantize_bytes(data, batches)

    accuracy = {}
    for precision, file in (("float32", data), ("int8", quantized)):
        runner = session(file)
        model = artifact_model(
            loaded,
            lambda images, runner=runner: runner.run(None, {"images": images})[0],
            resolution=resolution,
            with_preprocessing=with_preprocessing,
        )
        accuracy[precision] = evaluation.evaluate_accuracy(model, name, data_dir=data_dir)
    float_top1, int8_top1 = accuracy["float32"]["top1"], accuracy["int8"]["top1"]
    drop = (float_top1 - int8_top1) * 100
    eval_split = accuracy["int8"]["split"]
    if drop > max_drop:
        raise UserError(
            f"int8 top-1 {int8_top1:.2%} is {drop:.2f} points below float32 {float_top1:.2%} on "
            f"{name}:{eval_split}, above --max-drop {max_drop:g}; nothing was written. Pass --max-drop "
            f"{np.ceil(round(drop * 10, 6)) / 10:g} to accept it, calibrate on more images (--calibration-images), or "
            f"export float32 (drop --quantize)"
        )
    fields = {
        "int8": {
            "scheme": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax",
            "calibration": {"dataset": name, "split": split, "images": int(sum(len(b) for b in batches))},
            "dataset": name,
            "split": eval_split,
            "count": accuracy["int8"]["count"],
            "float32_top1": float_top1,
            "int8_top1": int8_top1,
            "drop_points": drop,
            "max_drop": max_drop,
        }
    }
    return quantized, fields
