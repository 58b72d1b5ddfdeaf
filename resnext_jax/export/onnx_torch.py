"""ONNX export through torchvision: `to_torchvision` -> torchvision's model (`load_state_dict(strict=True)`) ->
`torch.onnx.export`, then verified in onnxruntime before the file is written.

Why this route and not jax2onnx: both reproduce JAX on our models (measured 2026-12-06 on resnext50_32x4d with
BN statistics randomized, batch 3: 3.8e-5 through torchvision, 3.2e-5 with jax2onnx 0.17.1 on conv_impl='xla';
resnet18 8.5e-6 and 8.4e-6), but jax2onnx 0.17.1 pins orbax-checkpoint below 0.11.37 (we run 0.12) and brings
equinox, netron and huggingface-hub, while torch and torchvision are already the converter's extra. The price:
only what torchvision can build is exported (no SE in ResNet blocks, no group norm, no SiLU/GELU, no small stem,
no other widths); those fail with a message that points to the StableHLO route, never with a wrong model.

torch 2.14's default exporter (`dynamo=True`) needs onnxscript; the TorchScript one (`dynamo=False`, deprecated
but present) needs nothing more and gives opset-17 graphs that onnxruntime, TensorRT and OpenVINO read.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

from resnext_jax.errors import UserError
from resnext_jax.export import common
from resnext_jax.models.registry import create_model

OPSET = 17
# Module fields that do not change the eval-mode graph (or that `to_torchvision` handles).
_GRAPH_NEUTRAL = {
    "parent",
    "name",
    "num_classes",
    "dtype",
    "conv_impl",
    "scan_blocks",
    "bn_axis_name",
    "zero_init_last",
    "drop_path_rate",
    "dropout_rate",
}


def torchvision_differences(loaded) -> list[str]:
    """The module fields that torchvision's builder of the same name does not have: ['se_ratio=0.25', ...]."""
    reference = create_model(loaded.name)
    differences = []
    for field in dataclasses.fields(loaded.module):
        if field.name in _GRAPH_NEUTRAL:
            continue
        value, wanted = getattr(loaded.module, field.name), getattr(reference, field.name, None)
        if value != wanted:
            differences.append(f"{field.name}={value!r} (torchvision's: {wanted!r})")
    return differences


def check_dtype(dtype: str) -> None:
    """ONNX files are float32: onnxruntime's CPU provider has no bfloat16 convolutions to check them with."""
    if dtype != "float32":
        raise UserError(
            f"ONNX export is float32 only (onnxruntime's CPU provider has no {dtype} convolutions); "
            f"drop --dtype, or use --format stablehlo --dtype {dtype}"
        )


def export_onnx(
    loaded,
    out: str,
    *,
    batch: int | None = None,
    resolution: int | None = None,
    with_preprocessing: bool = False,
    dtype: str = "float32",
) -> dict:
    """Exports `loaded` (a `LoadedModel`) to the ONNX file `out` and its sidecar `out + '.json'`.

    Arguments as in `export_stablehlo`; `dtype` must be float32. The file is run once in onnxruntime on a random
    batch and on two photos, and written only if it reproduces `model.apply` (see `common.parity`).
    """
    check_dtype(dtype)
    differences = torchvision_differences(loaded)
    if differences:
        raise UserError(
            f"ONNX export goes through torchvision's {loaded.name}, which has no "
            f"{', '.join(differences)}; export this model with --format stablehlo"
        )
    try:
        import onnx  # noqa: F401  torch.onnx.export needs it, and says so only after tracing the model
        import onnxruntime
        import torch
        import torchvision
    except ImportError as error:
        raise UserError(
            f"ONNX export needs torch, torchvision, onnx and onnxruntime ({error}); pip install -e '.[torch,export]'"
        ) from error

    resolution = resolution or loaded.preprocessing.crop_size
    wrapped = _torch_model(loaded, torch, torchvision, with_preprocessing)
    example = torch.zeros(
        (batch or 2, resolution, resolution, 3), dtype=torch.uint8 if with_preprocessing else torch.float32
    )
    buffer = io.BytesIO()
    dynamic = None if batch else {"images": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    data = buffer.getvalue()

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = common.check_inputs(loaded.preprocessing, resolution, batch, with_preprocessing)
    checked = common.parity(
        loaded,
        dtype,
        inputs,
        lambda images: session.run(None, {"images": images})[0],
        with_preprocessing,
        f"the ONNX file of {loaded.name} (in onnxruntime)",
    )
    extra = {
        "opset": OPSET,
        "route": "to_torchvision + torch.onnx.export (TorchScript exporter)",
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "load": "onnxruntime.InferenceSession(file).run(None, {'images': images})[0]",
    }
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


def _torch_model(loaded, torch, torchvision, with_preprocessing: bool):
    """torchvision's model holding the loaded weights, behind NHWC input (and the normalization, if inside)."""
    from resnext_jax.convert import to_torchvision

    head_size = loaded.module.num_classes
    state = to_torchvision(loaded.name, loaded.variables, num_classes=head_size)
    model = getattr(torchvision.models, loaded.name)(num_classes=head_size or 1)  # not on "meta": RegNets compute
    if not head_size:  # their widths with tensors
        model.fc = torch.nn.Identity()
    model.load_state_dict(state, strict=True)
    model.eval()
    mean, inv_std = common.normalization_constants(loaded.preprocessing)

    class Serving(torch.nn.Module):
        """NHWC in, as the JAX model and the sidecar say; torchvision wants NCHW."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.from_numpy(mean.copy()))
            self.register_buffer("inv_std", torch.from_numpy(inv_std.copy()))

        def forward(self, images):
            if with_preprocessing:
                images = (images.to(torch.float32) - self.mean) * self.inv_std
            return self.model(images.permute(0, 3, 1, 2))

    return Serving().eval()
