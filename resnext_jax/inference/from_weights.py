"""`load_model`'s sources that are weights: a torchvision `.pth` file or weight tag, a timm `.safetensors` file or
weight tag, each with the preset its eval numbers were measured with."""

from __future__ import annotations

import os

import jax

from resnext_jax.errors import UserError
from resnext_jax.inference.loader import LoadedModel, Preprocessing, check_model_name, default_class_names
from resnext_jax.models.registry import create_model, list_models, model_info


def _torchvision_tag(name: str, path: str) -> str | None:
    """The weight tag whose download URL ends in `path`'s file name (e.g. resnext50_32x4d-1a0047aa.pth is V2)."""
    try:
        import torchvision

        for weights in torchvision.models.get_model_weights(name):
            if os.path.basename(weights.url) == os.path.basename(path):
                return weights.name
    except Exception:  # noqa: BLE001  torchvision missing or unaware of `name`: fall back to the default preset
        return None
    return None


def load_torchvision(source: str, model: str | None) -> LoadedModel:
    is_file = os.path.exists(source) or source.endswith((".pth", ".pt"))
    if not os.path.exists(source) and (is_file or os.sep in source):
        raise UserError(f"{source} does not exist; pass a workdir, a .pth file or a torchvision weight tag")
    if model is None:
        what = (
            f"{source} is a weights file"
            if is_file
            else f"{source!r} is not a directory, so it is read as a torchvision weight tag"
        )
        raise UserError(
            f"{what}; pass the model it belongs to, e.g. --model resnext50_32x4d (load_model(..., model=NAME))"
        )
    check_model_name(model, "--model")
    info = model_info(model)
    if is_file:
        tag = _torchvision_tag(model, source)
    elif source == "DEFAULT":  # torchvision's DEFAULT is the newest weights
        tag = "IMAGENET1K_V2" if "IMAGENET1K_V2" in info.weights else "IMAGENET1K_V1"
    else:
        tag = source
    if not is_file and tag not in info.weights:
        raise UserError(
            f"{model} has no torchvision weights {source!r}; use one of {list(info.weights) or 'none'}, "
            f"a .pth file or a workdir"
        )
    from resnext_jax.convert import ConversionError, from_torchvision

    try:
        variables = from_torchvision(model, source)
    except ImportError as error:
        raise UserError(f"reading torchvision weights needs torch ({error}); pip install -e '.[torch]'") from error
    except ConversionError as error:  # its first line sums up (and may name the right model); then every key
        summary = str(error).splitlines()[0]
        raise UserError(f"{source} does not fit {model}: {summary} (--verbose lists every key)") from error
    except UserError:  # the converter's own one-line errors (unreadable file, failed download) name the fix
        raise
    except Exception as error:
        if is_file:
            raise UserError(
                f"cannot read {source} as a torch state_dict ({type(error).__name__}: {error}); pass "
                f"a file saved with torch.save(model.state_dict(), path)"
            ) from error
        if isinstance(error, RuntimeError):  # the download failed; the message names the URL and the fix
            raise UserError(str(error)) from error
        raise
    resize = (
        {"IMAGENET1K_V1": info.resize_v1, "IMAGENET1K_V2": info.resize_v2}.get(tag)
        or info.resize_v2
        or info.resize_v1
        or info.eval_size
    )
    num_classes = int(variables["params"]["fc"]["kernel"].shape[-1])
    preprocessing = Preprocessing(
        resize_size=resize,
        crop_size=info.eval_size,
        mean=info.mean,
        std=info.std,
        class_names=default_class_names(num_classes),
    )
    return _loaded(model, "torchvision", source if is_file else None, tag, variables, preprocessing, num_classes)


# ---------------------------------------------------------------------------------------------------------------
# timm weights


def is_timm(source: str, model: str | None) -> bool:
    """timm's weights: a timm weight tag as the source or the model, a .safetensors file, or a timm-only name."""
    from resnext_jax.models.pretrained import is_pretrained_tag

    if is_pretrained_tag(source) or is_pretrained_tag(model) or source.endswith(".safetensors"):
        return True
    return model in list_models(source="timm") and model not in list_models(source="torchvision")


def load_timm(source: str, model: str | None) -> LoadedModel:
    from resnext_jax.models.pretrained import is_pretrained_tag, pretrained_config

    tag = source if is_pretrained_tag(source) else model if is_pretrained_tag(model) else None
    name = model.split(".", 1)[0] if model else tag.split(".", 1)[0] if tag else None
    if name is None:
        raise UserError(
            f"{source} is a weights file; pass the model it belongs to, e.g. --model regnety_032, or "
            f"the timm weight tag it was saved from (--model regnety_032.ra_in1k) for its exact preset"
        )
    check_model_name(name, "--model")  # a tag of another model as the source: from_timm names its model
    from resnext_jax.convert import ConversionError, from_timm

    try:
        variables = from_timm(name, source)
    except ImportError as error:
        raise UserError(
            f"reading timm weights needs torch and safetensors ({error}); pip install -e '.[torch]'"
        ) from error
    except ConversionError as error:  # its first line sums up and names the fix; then every key
        raise UserError(
            f"{source} does not fit {name}: {str(error).splitlines()[0]} (--verbose lists every key)"
        ) from error
    if tag:
        cfg = pretrained_config(tag)
        resize, crop, interpolation, mean, std = cfg.resize_size, cfg.crop_size, cfg.interpolation, cfg.mean, cfg.std
    else:  # the name's default weights' preset (a timm-only name), else torchvision's
        info = model_info(name)
        crop, interpolation, mean, std = info.eval_size, info.interpolation, info.mean, info.std
        resize = int(crop / info.crop_pct) if info.crop_pct else info.resize_v2 or info.resize_v1 or crop
    num_classes = int(variables["params"]["fc"]["kernel"].shape[-1]) if "fc" in variables["params"] else 0
    preprocessing = Preprocessing(
        resize_size=resize,
        crop_size=crop,
        mean=tuple(mean),
        std=tuple(std),
        class_names=default_class_names(num_classes),
        interpolation=interpolation,
    )
    path = source if os.path.exists(source) else None
    return _loaded(name, "timm", path, tag, variables, preprocessing, num_classes)


def _loaded(name: str, kind: str, path: str | None, tag, variables, preprocessing, num_classes: int) -> LoadedModel:
    """The `LoadedModel` of converted weights: the registry's module with their head, on the default device."""
    return LoadedModel(
        name=name,
        module=create_model(name, num_classes=num_classes),
        variables=jax.device_put(variables),
        preprocessing=preprocessing,
        source={
            "kind": kind,
            "path": os.path.abspath(path) if path else None,
            "which": None,
            "weights": tag,
            "step": None,
        },
        config=None,
        model_kwargs={"num_classes": num_classes},
    )
