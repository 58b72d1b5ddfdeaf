"""Using a trained model: `load_model`, predictions on image files, and the evaluation report.

    loaded = load_model("runs/quickstart")   # or load_model("x.pth", model="resnet50")
    for result in predict_files(loaded, ["photos/"]): ...

The command lines are `python -m resnext_jax.predict` and `python -m resnext_jax.evaluate`; docs/inference.md.
Only the loader is imported eagerly (`import resnext_jax` exports `load_model`); the image and report modules
pull in OpenCV and matplotlib, so they load on first use.
"""

from resnext_jax.inference.loader import (
    LoadedModel,
    Preprocessing,
    imagenet_class_names,
    load_model,
)

_LAZY = {"Prediction": "resnext_jax.inference.predictor", "predict_files": "resnext_jax.inference.predictor"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resnext_jax.inference' has no attribute {name!r}")


__all__ = ["LoadedModel", "Prediction", "Preprocessing", "imagenet_class_names", "load_model", "predict_files"]
