"""Export for serving: a StableHLO artifact (`jax.export`, symbolic batch) or an ONNX file (written from the Flax
variables by `onnx_graph`, no torch; int8 by `quantize`), each verified against `model.apply` before it is written,
and a JSON sidecar beside it (`PATH.json`: input layout and dtype, the preprocessing and whether it is inside, class
names, versions, the measured parity, and for int8 the float32 and int8 top-1).

    python -m resnext_jax.export runs/quickstart --format stablehlo --out model.stablehlo
    python -m resnext_jax.export IMAGENET1K_V2 --model resnext50_32x4d --format onnx --out rx50.onnx \
        --with-preprocessing
    python -m resnext_jax.export runs/quickstart --format onnx --out q.int8.onnx --quantize int8 --calibrate digits

    served = resnext_jax.export.load("rx50.onnx")        # or a .stablehlo file
    logits = served(images)                              # NHWC, as served.preprocessing says
    served.class_names[logits.argmax(-1)[0]]

The artifacts themselves need neither resnext_jax nor Flax: `jax.export.deserialize(bytes).call(images)` or
`onnxruntime.InferenceSession(path).run(None, {"images": images})`. `load_model` (so predict and evaluate) runs
them too (`inference.from_artifact`). docs/export.md has the details.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from resnext_jax.errors import InputError, UserError
from resnext_jax.export.common import FORMAT, SIDECAR_SUFFIX, sidecar_path

FORMATS = ("stablehlo", "onnx")
_STABLEHLO_OPTIONS = ("batch", "resolution", "with_preprocessing", "dtype")

__all__ = ["FORMATS", "ExportedModel", "export", "load", "sidecar_path"]


def export(loaded, out: str, *, format: str, **options) -> dict:
    """Exports a `LoadedModel` as `format` ('stablehlo' or 'onnx') to `out`; returns the sidecar written beside it.
    Options: batch (None: dynamic), resolution, with_preprocessing, dtype (see `stablehlo.export_stablehlo`); for
    ONNX also quantize='int8' with calibrate, calibration_images, max_drop, data_dir (see `onnx_export`)."""
    if format == "stablehlo" and options.get("quantize"):
        raise InputError(
            "--quantize int8 is for --format onnx (onnxruntime runs int8 QDQ files; StableHLO artifacts are "
            "float32 or bfloat16); use --format onnx --quantize int8, or drop --quantize"
        )
    if format == "stablehlo":
        from resnext_jax.export.stablehlo import export_stablehlo

        options = {key: value for key, value in options.items() if key in _STABLEHLO_OPTIONS}
        return export_stablehlo(loaded, out, **options)
    if format == "onnx":
        from resnext_jax.export.onnx_export import export_onnx

        return export_onnx(loaded, out, **options)
    raise InputError(f"format={format!r}; use one of {', '.join(FORMATS)}")


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """An exported model, ready to call: `served(images)` -> float32 logits (numpy).

    Attributes:
      path: the artifact.
      format: 'stablehlo' or 'onnx'.
      metadata: the whole sidecar.
      preprocessing: the sidecar's preprocessing ('inside', 'resize_size', 'crop_size', 'mean', 'std', 'steps').
      class_names: one name per logit.
    """

    path: str
    format: str
    metadata: dict
    preprocessing: dict
    class_names: tuple[str, ...]
    run: object = dataclasses.field(repr=False)
    run_exported: object = dataclasses.field(default=None, repr=False)  # StableHLO: the `jax.export.Exported`

    def __call__(self, images) -> np.ndarray:
        """images: (B, H, W, 3) in the sidecar's input dtype (uint8 when the preprocessing is inside)."""
        spec = self.metadata["input"]
        images = np.asarray(images)
        if images.ndim != 4 or list(images.shape[1:]) != spec["shape"][1:]:
            raise InputError(
                f"{self.path} takes images of shape {['B' if d is None else d for d in spec['shape']]} "
                f"(NHWC), not {list(images.shape)}; resize and crop them as its preprocessing says"
            )
        if spec["dtype"] == "uint8" and images.dtype != np.uint8:
            raise InputError(
                f"{self.path} normalizes inside and takes uint8 images, not {images.dtype}; pass the "
                f"resized and cropped pixels, before any normalization"
            )
        if spec["dtype"] == "float32" and images.dtype == np.uint8:
            raise InputError(
                f"{self.path} takes normalized float32 images, not uint8; apply (x / 255 - mean) / "
                f"std first, or export with --with-preprocessing"
            )
        batch = spec["shape"][0]
        if batch is not None and images.shape[0] != batch:
            raise InputError(
                f"{self.path} was exported for batch {batch}, not {images.shape[0]}; pad the batch "
                f"or export with --batch dynamic"
            )
        return np.asarray(self.run(images.astype(spec["dtype"], copy=False)), np.float32)


def load(path: str) -> ExportedModel:
    """Opens an artifact written by `python -m resnext_jax.export` (the artifact or its `.json` sidecar).

    Raises:
      UserError: naming the file and the fix: missing, no sidecar, a sidecar of something else, an artifact that
        does not match its sidecar (damaged or replaced), or one this jax/onnxruntime cannot read.
    """
    path = os.fspath(path)
    artifact = path.removesuffix(SIDECAR_SUFFIX)
    side = sidecar_path(artifact)
    if not os.path.exists(artifact):
        raise UserError(f"{artifact} does not exist; pass a file written by python -m resnext_jax.export")
    if not os.path.exists(side):
        raise UserError(
            f"{artifact} has no sidecar {side}: it was not written by python -m resnext_jax.export, or "
            f"the two files were separated; keep {os.path.basename(side)} beside it, or export again"
        )
    try:
        with open(side) as f:
            metadata = json.load(f)
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise ValueError(
                f"its 'format' is {metadata.get('format') if isinstance(metadata, dict) else None!r}, not {FORMAT!r}"
            )
        fmt, pre, names = metadata["artifact"], metadata["preprocessing"], tuple(metadata["class_names"])
        expected_hash = metadata["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{side} is not a resnext-jax export sidecar ({type(error).__name__}: {error}); "
            f"export the model again with python -m resnext_jax.export"
        ) from error
    import jax

    from resnext_jax.export.common import sha256

    if sha256(artifact) != expected_hash:
        raise UserError(
            f"{artifact} does not match its sidecar {os.path.basename(side)} (sha256 differs): the file "
            f"is damaged or was replaced; export it again"
        )
    exported = None
    if fmt == "stablehlo":
        exported = _open_stablehlo(artifact, metadata)
        run = jax.jit(exported.call)
    elif fmt == "onnx":
        run = _open_onnx(artifact)
    else:
        raise UserError(f"{side} describes a {fmt!r} artifact; this resnext-jax reads {', '.join(FORMATS)}")
    return ExportedModel(
        path=artifact,
        format=fmt,
        metadata=metadata,
        preprocessing=pre,
        class_names=names,
        run=run,
        run_exported=exported,
    )


def _open_stablehlo(artifact: str, metadata: dict):
    import jax

    with open(artifact, "rb") as f:
        data = bytearray(f.read())
    try:
        exported = jax.export.deserialize(data)
    except Exception as error:  # flatbuffer or version errors
        raise UserError(
            f"jax {jax.__version__} cannot deserialize {artifact} (exported with jax "
            f"{metadata.get('jax_version')}: {type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"jax reads artifacts up to 6 months old: export it again with this jax"
        ) from error
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if platform not in exported.platforms:
        raise UserError(
            f"{artifact} was lowered for {', '.join(exported.platforms)}, not {platform}; export it again "
            f"on a machine with jax for {platform}, or run it on {exported.platforms[0]}"
        )
    return exported


def _open_onnx(artifact: str):
    try:
        import onnxruntime
    except ImportError as error:
        raise UserError(f"running {artifact} needs onnxruntime; pip install onnxruntime") from error
    try:
        session = onnxruntime.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's Fail/InvalidGraph exceptions
        raise UserError(
            f"onnxruntime {onnxruntime.__version__} cannot open {artifact} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); export it again"
        ) from error
    return lambda images: session.run(None, {"images": images})[0]
