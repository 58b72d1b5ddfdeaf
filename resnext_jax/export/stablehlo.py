"""StableHLO export: `jax.export` of the serving function, weights embedded, batch symbolic.

The artifact is `Exported.serialize()`'s bytes. Anything with jax installed runs it, without resnext_jax:

    exported = jax.export.deserialize(open("resnext50.stablehlo", "rb").read())
    logits = exported.call(images)              # images: (B, 224, 224, 3) float32 (uint8 with preprocessing)

jax reads artifacts up to 6 months old (and 3 weeks newer than itself); re-export after a larger jax upgrade.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.errors import UserError
from resnext_jax.export import common

log = logging.getLogger(__name__)

PLATFORMS = ("cpu", "cuda")


def export_stablehlo(
    loaded,
    out: str,
    *,
    batch: int | None = None,
    resolution: int | None = None,
    with_preprocessing: bool = False,
    dtype: str = "float32",
) -> dict:
    """Exports `loaded` (a `LoadedModel`) to the StableHLO file `out` and its sidecar `out + '.json'`.

    Args:
      batch: a fixed batch size, or None for a symbolic one (any batch runs, one artifact).
      resolution: the square input size (default: the preprocessing's crop). An artifact has one resolution.
      with_preprocessing: take uint8 images and normalize inside (see `common`).
      dtype: compute dtype, 'float32' or 'bfloat16' (the input stays float32 or uint8, the logits float32).

    Returns the sidecar dict. Raises `UserError` if the deserialized artifact does not reproduce `model.apply`.
    """
    resolution = resolution or loaded.preprocessing.crop_size
    module = common.export_module(loaded, dtype)
    serve = common.serving_function(module, loaded.variables, loaded.preprocessing, with_preprocessing)
    batch_dim = jax.export.symbolic_shape("batch")[0] if batch is None else batch
    spec = jax.ShapeDtypeStruct(
        (batch_dim, resolution, resolution, 3), jnp.uint8 if with_preprocessing else jnp.float32
    )
    exported, platforms_note = _export(serve, spec)
    ours = common.our_custom_calls(exported.mlir_module())
    if ours:  # conv_impl='xla' should make this impossible; never ship a file that needs our process
        raise RuntimeError(f"the exported module calls resnext_jax's native kernels {ours}")
    data = bytes(exported.serialize())

    restored = jax.export.deserialize(bytearray(data))  # what a server will run, not the in-memory object
    run = jax.jit(restored.call)
    inputs = common.check_inputs(loaded.preprocessing, resolution, batch, with_preprocessing)
    checked = common.parity(
        loaded,
        dtype,
        inputs,
        lambda images: np.asarray(run(images)),
        with_preprocessing,
        f"the StableHLO artifact of {loaded.name}",
    )
    extra = {
        "platforms": list(exported.platforms),
        "platforms_note": platforms_note,
        "calling_convention_version": exported.calling_convention_version,
        "load": "jax.export.deserialize(open(file, 'rb').read()).call(images)",
    }
    return common.write_artifact(
        out,
        data,
        loaded,
        fmt="stablehlo",
        batch=batch,
        resolution=resolution,
        with_preprocessing=with_preprocessing,
        dtype=dtype,
        checked=checked,
        extra=extra,
    )


def _export(serve, spec) -> tuple[jax.export.Exported, str | None]:
    """Lowers for cpu and cuda in one artifact; for cpu alone (with the reason, kept in the sidecar) if this jax
    cannot lower for cuda."""
    try:
        return jax.export.export(jax.jit(serve), platforms=PLATFORMS)(spec), None
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001  a jaxlib without the cuda lowering rules, for one
        reason = f"lowering for cuda failed here ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        log.warning("%s; the artifact runs on cpu only", reason)
        return jax.export.export(jax.jit(serve), platforms=("cpu",))(spec), reason
