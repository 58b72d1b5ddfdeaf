"""`load_model`'s source that is an exported file (`python -m resnext_jax.export`): an ONNX file run by onnxruntime
or a StableHLO artifact run by jax, with the sidecar's preprocessing and class names.

The file stands in for the Flax module: `ArtifactModule.apply(variables, images, train=False)` takes the normalized
float32 NHWC batch that `predict` and `evaluate` build for any model and returns float32 logits, inside `jax.jit`
(StableHLO: the deserialized program itself; ONNX: a host callback into onnxruntime). So the accuracy, the speed and
the report of a shipped file come from the same code as a workdir's.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.errors import UserError
from resnext_jax.inference.loader import LoadedModel, Preprocessing

ARTIFACT_SUFFIXES = (".onnx", ".stablehlo")
ONNX_PROVIDER = "CPUExecutionProvider"


@dataclasses.dataclass(frozen=True, eq=False)
class ArtifactModule:
    """The module of a `LoadedModel` read from an exported file (no variables: the weights are in the file).

    Attributes:
      run: (B, R, R, 3) numpy in the file's input dtype -> float32 numpy logits (ONNX), or None.
      exported: the deserialized `jax.export.Exported` (StableHLO), or None.
      batch: the file's fixed batch size, or None for any batch.
      num_classes: logits per image.
      inside: the file takes uint8 pixels and normalizes them itself; `apply` turns the normalized input back.
      mean, std: the preprocessing's (0-1 scale).
      dtype: the compute dtype recorded by the report (float32; bfloat16 for a bfloat16 StableHLO file).
    """

    run: object
    exported: object
    batch: int | None
    num_classes: int
    inside: bool
    mean: tuple
    std: tuple
    dtype: object = jnp.float32

    def clone(self, **_fields) -> ArtifactModule:
        """The file is one fixed program: fields such as `bn_axis_name` change nothing."""
        return self

    def apply(self, variables, images, train: bool = False):
        """float32 logits (B, classes) of normalized float32 NHWC `images`; jit-compatible."""
        del variables
        if train:
            raise UserError("an exported model runs at inference only; train from the workdir it came from")
        if self.inside:  # back to the uint8 pixels the loaders normalized (exact: errors are far below 1/2)
            scale, offset = np.float32(255) * np.asarray(self.std, np.float32), np.float32(255) * np.asarray(self.mean)
            images = jnp.clip(jnp.round(images * scale + offset.astype(np.float32)), 0, 255).astype(jnp.uint8)
        else:
            images = images.astype(jnp.float32)
        size = images.shape[0]
        chunk = self.batch or size
        padded = -(-size // chunk) * chunk
        if padded != size:  # a fixed-batch file: pad to whole batches
            images = jnp.concatenate([images, jnp.zeros((padded - size, *images.shape[1:]), images.dtype)])
        outputs = [self._call(images[start : start + chunk]) for start in range(0, padded, chunk)]
        return jnp.concatenate(outputs)[:size] if len(outputs) > 1 else outputs[0][:size]

    def _call(self, images):
        if self.exported is not None:
            return self.exported.call(images).astype(jnp.float32)
        shape = jax.ShapeDtypeStruct((images.shape[0], self.num_classes), jnp.float32)
        return jax.pure_callback(
            lambda x: np.asarray(self.run(np.asarray(x)), np.float32), shape, images, vmap_method="sequential"
        )


def is_artifact(source: str) -> bool:
    """Whether `source` names an exported file: an .onnx or .stablehlo path, or a file with an export sidecar."""
    if source.endswith(ARTIFACT_SUFFIXES) or (source.endswith(".json") and source[:-5].endswith(ARTIFACT_SUFFIXES)):
        return True
    return os.path.isfile(source) and os.path.isfile(source + ".json") and _sidecar_format(source + ".json")


def _sidecar_format(path: str) -> bool:
    import json

    try:
        with open(path) as f:
            return json.load(f).get("format") == "resnext_jax.export"
    except (OSError, ValueError, AttributeError):
        return False


def runtime_fields(loaded: LoadedModel) -> dict:
    """{'runtime', 'provider', 'precision'} of what runs `loaded`: jax on its backend for a workdir or weights,
    onnxruntime's provider or jax for an exported file, with the file's precision (float32, bfloat16, int8)."""
    if isinstance(loaded.module, ArtifactModule):
        return {key: loaded.source[key] for key in ("runtime", "provider", "precision")}
    return {"runtime": "jax", "provider": jax.default_backend(), "precision": str(np.dtype(loaded.module.dtype))}


def load_artifact(path: str, resize_size: int | None = None, crop_size: int | None = None) -> LoadedModel:
    """A `LoadedModel` that runs the exported file `path` (or its sidecar); see the module docstring."""
    from resnext_jax.export import load

    _check_content(path)
    served = load(path)
    meta, pre = served.metadata, served.preprocessing
    if crop_size is not None and crop_size != pre["crop_size"]:
        raise UserError(
            f"{served.path} takes {pre['crop_size']}x{pre['crop_size']} images; drop --crop {crop_size}, or export "
            f"again with --resolution {crop_size}"
        )
    interpolation = "bicubic" if "bicubic" in pre.get("interpolation", "") else "bilinear"
    preprocessing = Preprocessing(
        resize_size=resize_size or pre["resize_size"],
        crop_size=pre["crop_size"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        class_names=served.class_names,
        interpolation=interpolation,
    )
    if served.format == "onnx":
        precision = meta.get("precision", "float32")
        runtime, provider, exported = "onnxruntime", ONNX_PROVIDER, None
    else:
        precision, runtime, provider = meta["compute_dtype"], "jax (StableHLO)", jax.default_backend()
        exported = served.run_exported
    module = ArtifactModule(
        run=served.run,
        exported=exported,
        batch=meta["input"]["shape"][0],
        num_classes=len(served.class_names),
        inside=bool(pre["inside"]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        dtype=jnp.dtype(meta.get("compute_dtype", "float32")),
    )
    source = {
        "kind": served.format,
        "path": os.path.abspath(served.path),
        "exported_from": meta.get("source"),
        "runtime": runtime,
        "provider": provider,
        "precision": precision,
        "sha256": meta["sha256"],
    }
    return LoadedModel(
        name=meta["model"],
        module=module,
        variables={},
        preprocessing=preprocessing,
        source=source,
        config=None,
        model_kwargs=dict(meta.get("model_kwargs") or {}),
    )


def _check_content(path: str) -> None:
    """A file named like an artifact but holding something else gets one line saying so, before the sidecar."""
    artifact = path.removesuffix(".json") if path.endswith(".json") else path
    if not os.path.isfile(artifact) or os.path.isfile(artifact + ".json"):
        return  # export.load names a missing file, and checks a sidecar's file by its sha256
    if artifact.endswith(".onnx") and not _looks_like_onnx(artifact):
        kind = "ONNX"
    elif artifact.endswith(".stablehlo") and not _looks_like_stablehlo(artifact):
        kind = "StableHLO"
    else:
        return
    raise UserError(
        f"{artifact} is not an {kind} file (its bytes do not parse as one); pass a file written by "
        f"python -m resnext_jax.export, with its sidecar {os.path.basename(artifact)}.json beside it"
    )


def _looks_like_onnx(path: str) -> bool:
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        return len(model.graph.node) > 0
    except Exception:  # noqa: BLE001  protobuf's DecodeError and friends
        return False


def _looks_like_stablehlo(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            jax.export.deserialize(bytearray(f.read()))
        return True
    except Exception:  # noqa: BLE001  flatbuffer errors
        return False
