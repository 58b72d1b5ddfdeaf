"""`load_model`: one way from a training workdir, torchvision or timm weights to a module, its variables and the
exact preprocessing its eval numbers were measured with (the sources are read by `inference.from_run` and
`inference.from_weights`).

    loaded = resnext_jax.load_model("runs/quickstart")                       # best checkpoint of a run
    loaded = resnext_jax.load_model("resnext50_32x4d-1a0047aa.pth", model="resnext50_32x4d")
    logits = loaded.module.apply(loaded.variables, images, train=False)    # images: NHWC, normalized

Reading a workdir never writes to it (no Orbax manager, no temp-directory cleanup), so a model can be loaded while
its run is still training.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources

from resnext_jax.errors import UserError
from resnext_jax.models.registry import list_models


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input, as `create_eval_loader(..., interpolation=...)` does it.

    Attributes:
      resize_size: the shorter side is resized to this (with `interpolation`), then
      crop_size: the central crop_size x crop_size square is kept, and each RGB value v in [0, 1] becomes
      mean, std: (v - mean) / std per channel.
      class_names: one name per output class (torchvision's spelling for ImageNet; '0'..'9' for digits).
      interpolation: the resize filter, "bilinear" (antialiased; torchvision's presets and training runs) or
        "bicubic" (most timm weights: their resize_size is floor(crop_size / crop_pct)).
    """

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    interpolation: str = "bilinear"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run model: `module.apply(variables, images, train=False)` gives float32 logits.

    Attributes:
      name: the registry builder name (e.g. 'resnext50_32x4d').
      module: the Flax module (built without a BatchNorm axis name, for plain jit).
      variables: {'params', 'batch_stats'} on the default device.
      preprocessing: see `Preprocessing`.
      source: what was loaded, for reports: {'kind': 'workdir'|'torchvision', 'path', 'step', 'weights', ...}.
      config: the run's resolved config (config.json) for a workdir, else None.
      model_kwargs: the `create_model` fields besides the name (so `summarize` can rebuild the same model).
    """

    name: str
    module: object
    variables: dict
    preprocessing: Preprocessing
    source: dict
    config: dict | None
    model_kwargs: dict

    def predict(self, images, top_k: int = 5, batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) pairs, best first, one list per image, in order.

        `images`: one image or a list of them, each a path, a PIL image, or an HWC array (uint8 pixels, or float
        in 0..1); an (N, H, W, 3) array is N images. Each goes through `preprocessing` as the files of
        `predict_files` and the eval loader do. Jitted once per model, compiled once per batch size.
        """
        from resnext_jax.inference import arrays

        return arrays.predict(self, images, top_k=top_k, batch_size=batch_size)

    def features(self, images, batch_size: int = 64) -> dict:
        """The images' stage features as float32 NHWC numpy arrays: {'stage1': (N, H/4, W/4, C), ...,
        'pre_logits': (N, C)} (`create_model(..., return_features=True)`); images as in `predict`."""
        from resnext_jax.inference import arrays

        return arrays.features(self, images, batch_size=batch_size)


def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names as torchvision spells them (`meta['categories']`), read from the package
    so predictions on converted weights are readable offline and without torch."""
    text = resources.files("resnext_jax.inference").joinpath("imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def default_class_names(num_classes: int, dataset_info=None, dataset: str | None = None) -> tuple[str, ...]:
    """Names for `num_classes` outputs: the dataset's if it has them, ImageNet's for 1000 outputs of torchvision
    weights or an imagenet2012 run, else '0', '1', ..."""
    names = getattr(dataset_info, "class_names", None)
    if names and len(names) == num_classes:
        return tuple(names)
    if num_classes == 1000 and dataset in (None, "imagenet2012"):
        return imagenet_class_names()
    return tuple(str(index) for index in range(num_classes))


def load_model(
    source: str,
    *,
    model: str | None = None,
    which: str | int = "best",
    resize_size: int | None = None,
    crop_size: int | None = None,
) -> LoadedModel:
    """Loads a usable model from a training workdir, a torchvision `.pth` file or a torchvision weight tag.

    Args:
      source: a workdir (holds config.json and checkpoints/), a `.pth`/`.pt` state_dict file, a torchvision
        weight tag ('IMAGENET1K_V1', 'IMAGENET1K_V2', 'DEFAULT'; torchvision downloads it once), timm's
        `.safetensors` file, a timm weight tag ('regnety_032.ra_in1k'; downloaded from the Hugging Face hub), or
        an exported `.onnx` / `.stablehlo` file with its sidecar (`inference.from_artifact`: run by onnxruntime or
        jax, with the sidecar's preprocessing and class names; `model` and `which` are ignored).
      model: the builder name; required for torchvision weights, and must match the run's model for a workdir.
        A timm weight tag here ('resnext50_32x4d.a1h_in1k') names the model and the preset its file was
        evaluated with (timm's crop_pct and bicubic resize); a timm-only name takes its default weights' preset.
      which: for a workdir, 'best' (highest logged eval top-1 among the kept checkpoints; the latest if none
        was evaluated), 'latest', 'ema' (the EMA weights of the latest checkpoint) or a step number.
      resize_size, crop_size: override the preset (e.g. a .pth whose preset is not torchvision's).

    Raises:
      UserError: with the fix in its message (no checkpoint, unknown model, missing `model=`, incomplete step...).
    """
    from resnext_jax.inference.from_artifact import is_artifact, load_artifact
    from resnext_jax.inference.from_run import load_workdir
    from resnext_jax.inference.from_weights import is_timm, load_timm, load_torchvision

    source = os.fspath(source)
    if is_artifact(source):
        return load_artifact(source, resize_size, crop_size)
    if os.path.isdir(source):
        loaded = load_workdir(source, model, which)
    elif is_timm(source, model):
        loaded = load_timm(source, model)
    else:
        loaded = load_torchvision(source, model)
    pre = loaded.preprocessing
    pre = dataclasses.replace(pre, resize_size=resize_size or pre.resize_size, crop_size=crop_size or pre.crop_size)
    if pre.resize_size < pre.crop_size:
        raise UserError(
            f"resize size {pre.resize_size} is smaller than the crop {pre.crop_size}; "
            f"pass a resize size of at least {pre.crop_size}"
        )
    return dataclasses.replace(loaded, preprocessing=pre)


def check_model_name(name, what: str) -> None:
    if name not in list_models():
        import difflib

        close = difflib.get_close_matches(str(name), list_models(), n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UserError(f"{what} names unknown model {name!r}{hint}; use one of resnext_jax.list_models()")
