"""What both export routes share: the served function, the parity check and the sidecar.

The served function is the model's eval forward pass, optionally with the preprocessing's last step inside: with
`with_preprocessing` it takes uint8 NHWC images already resized and cropped, and casts and normalizes them with the
loaders' arithmetic (`resnext_jax.data.transforms.normalize`: `(x - 255 mean) * (1 / (255 std))`), so a served
photo gives the logits that `python -m resnext_jax.predict` gives.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.errors import UserError, disk_error

FORMAT = "resnext_jax.export"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".json"
# float32 artifacts must reproduce JAX's logits to this max-abs error, scaled by max(1, std of the logits): random
# weights can give logits of std 100, where float32 summation order alone moves a logit by more than 1e-4.
# bfloat16 logits are not reproducible to better than a few percent of their std: where XLA rounds intermediates
# to bfloat16 depends on its fusion choices, which differ between two compilations of the same program (measured
# 1.5-3% on resnet18, once 4.1% in a full test run, the same for the native kernels against XLA). 10% still
# catches wrong weights or a wrong normalization (errors of the logits' own size); float32 is the precision-verified
# format.
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1}
OUR_CUSTOM_CALL_PREFIX = "resnext_jax_"


def sidecar_path(artifact: str) -> str:
    """The JSON beside an artifact: `model.onnx` -> `model.onnx.json`."""
    return os.fspath(artifact) + SIDECAR_SUFFIX


def scaled_preprocessing(preprocessing, resolution: int):
    """`preprocessing` at another crop `resolution`, its resize scaled in proportion (232 at 224 is 265 at 256)."""
    import dataclasses

    resize = max(resolution, round(preprocessing.resize_size * resolution / preprocessing.crop_size))
    return dataclasses.replace(preprocessing, resize_size=resize, crop_size=resolution)


def export_module(loaded, dtype: str):
    """The loaded module as it is exported: pure-XLA convolutions (our native CPU kernels are custom calls that
    exist only in a process that imported resnext_jax, and carry no compatibility guarantee) in `dtype`."""
    return loaded.module.clone(conv_impl="xla", dtype=jnp.dtype(dtype))


def normalization_constants(preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(255 mean, 1 / (255 std)) as float32, the constants of `transforms.normalize`."""
    mean = np.asarray(preprocessing.mean, np.float32) * np.float32(255.0)
    inv_std = np.float32(1.0) / (np.asarray(preprocessing.std, np.float32) * np.float32(255.0))
    return mean, inv_std


def serving_function(module, variables, preprocessing, with_preprocessing: bool):
    """images (B, H, W, 3) -> float32 logits, the variables closed over (so they are embedded in the artifact)."""
    mean, inv_std = normalization_constants(preprocessing)

    def serve(images):
        if with_preprocessing:
            images = (images.astype(jnp.float32) - mean) * inv_std
        return module.apply(variables, images, train=False).astype(jnp.float32)

    return serve


def our_custom_calls(module_text: str) -> list[str]:
    """The custom-call targets of ours in a StableHLO module's text (there must be none in an artifact)."""
    targets = re.findall(r'custom_call\s*@"?([A-Za-z0-9_.$-]+)', module_text)
    targets += re.findall(r'call_target_name\s*=\s*"([^"]+)"', module_text)
    return sorted({target for target in targets if target.startswith(OUR_CUSTOM_CALL_PREFIX)})


def check_inputs(preprocessing, resolution: int, batch: int | None, with_preprocessing: bool, seed: int = 0):
    """Inputs the exporters verify on: {'random': ..., 'photos': ...}, as the artifact takes them.

    The photos are scikit-learn's two bundled JPEGs (china.jpg, flower.jpg) through the eval preset, so the check
    also covers realistic pixels; the random batch covers every value range. A fixed batch N gets N images.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from resnext_jax.inference import images as image_io

    size = batch or 2
    rng = np.random.default_rng(seed)
    resize = max(resolution, round(preprocessing.resize_size * resolution / preprocessing.crop_size))
    photos = np.stack(
        [image_io.preprocess(Image.fromarray(photo), resize, resolution) for photo in load_sample_images().images]
    )
    photos = np.resize(photos, (size, *photos.shape[1:]))  # repeated to a fixed batch
    random = rng.integers(0, 256, (size, resolution, resolution, 3), dtype=np.uint8)
    if with_preprocessing:
        return {"random": random, "photos": photos}
    return {
        "random": rng.standard_normal((size, resolution, resolution, 3)).astype(np.float32),
        "photos": image_io.normalize(photos, preprocessing.mean, preprocessing.std),
    }


def reference_function(loaded, dtype: str, with_preprocessing: bool):
    """`model.apply` of the loaded module itself (its own conv_impl, in `dtype`), jitted: what the artifact must
    match. Takes what the artifact takes."""
    module = loaded.module.clone(dtype=jnp.dtype(dtype))
    mean, inv_std = normalization_constants(loaded.preprocessing)

    @jax.jit
    def apply(variables, images):
        if with_preprocessing:
            images = (images.astype(jnp.float32) - mean) * inv_std
        return module.apply(variables, images, train=False).astype(jnp.float32)

    return lambda images: np.asarray(apply(loaded.variables, images))


def parity(loaded, dtype: str, inputs: dict, run, with_preprocessing: bool, what: str) -> dict:
    """Runs `run` (the exported file) on each input against JAX; raises if any error exceeds the tolerance.

    Returns {'max_abs_error', 'tolerance', 'logit_std', 'inputs'} for the sidecar.
    """
    errors, scale = {}, 1.0
    reference = reference_function(loaded, dtype, with_preprocessing)
    for name, images in inputs.items():
        expected = reference(images)
        got = np.asarray(run(images), np.float32)
        if got.shape != expected.shape:
            raise RuntimeError(f"{what} gives logits of shape {got.shape}, JAX {expected.shape}")
        errors[name] = float(np.max(np.abs(got - expected)))
        scale = max(scale, float(np.std(expected)))
    tolerance = TOLERANCE[dtype] * scale
    worst = max(errors.values())
    if not worst <= tolerance:  # also catches NaN
        raise UserError(
            f"{what} does not reproduce JAX's logits: max-abs error {worst:.3g} (random input "
            f"{errors['random']:.3g}, sample photos {errors['photos']:.3g}) above the tolerance "
            f"{tolerance:.3g}; nothing was written. Report this with the command that gave it"
        )
    return {"max_abs_error": worst, "errors": errors, "tolerance": tolerance, "logit_std_scale": scale}


def sidecar(
    loaded,
    *,
    artifact: str,
    fmt: str,
    batch: int | None,
    resolution: int,
    with_preprocessing: bool,
    dtype: str,
    checked: dict,
    extra: dict,
) -> dict:
    """The JSON written beside an artifact: everything a server needs to feed it and read its output."""
    pre = scaled_preprocessing(loaded.preprocessing, resolution)
    resize = pre.resize_size
    num_classes = len(pre.class_names)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": fmt,
        "file": os.path.basename(artifact),
        "sha256": sha256(artifact),
        "bytes": os.path.getsize(artifact),
        "model": loaded.name,
        "model_kwargs": _jsonable(loaded.model_kwargs),
        "source": _jsonable(loaded.source),
        "compute_dtype": dtype,
        "input": {
            "name": "images",
            "layout": "NHWC",
            "dtype": "uint8" if with_preprocessing else "float32",
            "shape": [batch, resolution, resolution, 3],
        },
        "output": {"name": "logits", "dtype": "float32", "shape": [batch, num_classes]},
        "preprocessing": {
            "inside": with_preprocessing,
            "resize_size": resize,
            "crop_size": resolution,
            "interpolation": f"{pre.interpolation}, antialiased",
            "mean": list(pre.mean),
            "std": list(pre.std),
            "steps": (
                "client: decode RGB, resize the shorter side to resize_size, center-crop crop_size, send "
                "uint8; inside: (x - 255 mean) / (255 std)"
            )
            if with_preprocessing
            else (
                "client: decode RGB, resize the shorter side to resize_size, center-crop crop_size, then "
                "(x / 255 - mean) / std per channel, float32"
            ),
        },
        "class_names": list(pre.class_names),
        "parity": checked,
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def write_artifact(out: str, data: bytes, loaded, **fields) -> dict:
    """Writes the artifact, then its sidecar (`sidecar(loaded, artifact=out, **fields)`), each through a temporary
    file and a rename, so a reader never sees half a file or an artifact beside the sidecar of an older one."""
    out = os.fspath(out)
    side = sidecar_path(out)
    try:
        directory = os.path.dirname(os.path.abspath(out))
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(side):
            os.remove(side)
        _atomic_write(out, data)
        metadata = sidecar(loaded, artifact=out, **fields)
        _atomic_write(side, (json.dumps(metadata, indent=1) + "\n").encode())
    except OSError as error:
        raise disk_error(error, out, "the exported model") from error
    return metadata


def _atomic_write(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
