"""ONNX export without torch: `onnx_graph.build` writes the graph from the model's fields and Flax variables, and
the file is run in onnxruntime against `model.apply` before it is written (`common.parity`).

Why not through torchvision (the route before 2026-12-07): `to_torchvision` + `torch.onnx.export` could only
export what torchvision builds (no small stem, SE in ResNets, group norm, SiLU/GELU, ResNet-D or any timm-only
name) and needed torch to export a JAX model. The writer covers every registry model with the `onnx` package
alone and gives the same parity (docs/export.md). jax2onnx would also work, but pins an older orbax.
"""

from __future__ import annotations

from resnext_jax.errors import UserError
from resnext_jax.export import common
from resnext_jax.export.onnx_graph import OPSET, build


def check_dtype(dtype: str) -> None:
    """ONNX files are float32 (int8 with `--quantize int8`): onnxruntime's CPU provider has no bfloat16 convs."""
    if dtype != "float32":
        raise UserError(
            f"ONNX export is float32 only (onnxruntime's CPU provider has no {dtype} convolutions); "
            f"drop --dtype (or use --quantize int8), or use --format stablehlo --dtype {dtype}"
        )


def onnx_modules():
    """(onnx, onnxruntime), or a UserError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise UserError(f"ONNX export needs onnx and onnxruntime ({error}); pip install -e '.[export]'") from error
    return onnx, onnxruntime


def onnx_bytes(loaded, *, batch: int | None, resolution: int, with_preprocessing: bool) -> bytes:
    """The float32 ONNX file of `loaded` (a `LoadedModel`), unverified."""
    normalization = common.normalization_constants(loaded.preprocessing) if with_preprocessing else None
    model = build(loaded.module, loaded.variables, batch=batch, resolution=resolution, normalization=normalization)
    return model.SerializeToString()


def session(data: bytes | str):
    """An onnxruntime CPU session of a file's bytes or path."""
    _, onnxruntime = onnx_modules()
    return onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])


def export_onnx(
    loaded,
    out: str,
    *,
    batch: int | None = None,
    resolution: int | None = None,
    with_preprocessing: bool = False,
    dtype: str = "float32",
    quantize: str | None = None,
    calibrate: str | None = None,
    calibration_images: int = 512,
    max_drop: float = 1.0,
    data_dir: str | None = None,
) -> dict:
    """Exports `loaded` (a `LoadedModel`) to the ONNX file `out` and its sidecar `out + '.json'`.

    Arguments as in `export_stablehlo`; `dtype` must be float32. The float file is run in onnxruntime on a random
    batch and on two photos, and kept only if it reproduces `model.apply` (see `common.parity`). With
    `quantize='int8'` it is then quantized (`export.quantize`), calibrated on `calibrate` ('NAME[:split]'), and
    written only if its top-1 on the eval split is at most `max_drop` points below the float file's.
    """
    check_dtype(dtype)
    _, onnxruntime = onnx_modules()
    resolution = resolution or loaded.preprocessing.crop_size
    data = onnx_bytes(loaded, batch=batch, resolution=resolution, with_preprocessing=with_preprocessing)
    float_session = session(data)
    inputs = common.check_inputs(loaded.preprocessing, resolution, batch, with_preprocessing)
    checked = common.parity(
        loaded,
        dtype,
        inputs,
        lambda images: float_session.run(None, {"images": images})[0],
        with_preprocessing,
        f"the ONNX file of {loaded.name} (in onnxruntime)",
    )
    extra = {
        "opset": OPSET,
        "route": "resnext_jax.export.onnx_graph (onnx helper API, BatchNorm folded into Conv)",
        "onnxruntime_version": onnxruntime.__version__,
        "precision": "float32",
        "load": "onnxruntime.InferenceSession(file).run(None, {'images': images})[0]",
    }
    if quantize is not None:
        from resnext_jax.export.quantize import quantize_int8

        data, quantized = quantize_int8(
            loaded,
            data,
            calibrate=calibrate,
            calibration_images=calibration_images,
            max_drop=max_drop,
            resolution=resolution,
            with_preprocessing=with_preprocessing,
            data_dir=data_dir,
        )
        extra.update(quantized, precision="int8")
    return common.write_artifact(
        out,
        data,
        loaded,
        fmt="onnx",
        batch=batch,
        resolution=resolution,
        with_preprocessing=with_preprocessing,
        dtype=dtype,
        checked=checked,
        extra=extra,
    )
