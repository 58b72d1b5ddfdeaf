"""`evaluate` and `predict` with a timm weight's preset: the eval loader's pixels are timm's own transform's, the
accuracy pass runs on them, and the report names the interpolation.

The reference is timm itself, `create_transform(**resolve_data_config(...))`, on scikit-learn's two sample JPEGs,
prepared as a two-class folder dataset (the files are stored as they are, so the loader decodes the same bytes).
"""

import json
import math
import os
import shutil
import types

import jax
import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from resnext_jax.errors import run_cli
from resnext_jax.inference import evaluation
from resnext_jax.inference.images import normalize, preprocess
from resnext_jax.inference.loader import Preprocessing
from resnext_jax.models.pretrained import pretrained_config

PHOTOS = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
CLASSES = ("china", "flower")  # sorted class folders: label 0 and 1
# Bicubic at crop_pct 0.95 (resize 235), bicubic at 0.875 (256), and a bilinear 176-px tag (torchvision's V2).
TAGS = ("resnext50_32x4d.a1h_in1k", "regnetx_002.pycls_in1k", "resnet50.tv2_in1k")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """The data_dir of dataset 'photos': china.jpg and flower.jpg, each its own class, in both splits."""
    from resnext_jax.data.prepare.folder import prepare_folder

    root = tmp_path_factory.mktemp("photos")
    for split in ("train", "val"):
        for name in CLASSES:
            os.makedirs(root / split / name)
            shutil.copy(os.path.join(PHOTOS, f"{name}.jpg"), root / split / name / f"{name}.jpg")
    prepare_folder(str(root / "train"), "photos", data_dir=str(root / "data"), val_dir=str(root / "val"), quiet=True)
    return str(root / "data")


def photo(label: int) -> Image.Image:
    with Image.open(os.path.join(PHOTOS, f"{CLASSES[label]}.jpg")) as image:
        return image.convert("RGB")


def preset(tag: str) -> Preprocessing:
    """What `load_model` gives a timm tag (tests/test_timm_preprocessing.py checks that it does)."""
    cfg = pretrained_config(tag)
    return Preprocessing(
        resize_size=cfg.resize_size,
        crop_size=cfg.crop_size,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        class_names=CLASSES,
        interpolation=cfg.interpolation,
    )


@pytest.mark.parametrize("tag", TAGS)
def test_the_eval_loader_gives_timms_pixels(photos, tag):
    """evaluate's loader, fed the model's preset, gives timm's eval pixels within 1/255 and predict's exactly."""
    import timm

    pre = preset(tag)
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(tag).to_dict())
    transform = timm.data.create_transform(**config)
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (
        math.floor(config["input_size"][-1] / config["crop_pct"]),
        config["input_size"][-1],
        config["interpolation"],
    )
    # Only the preprocessing of a LoadedModel is read to build the loader: no weights needed.
    loader = evaluation.eval_loader(
        types.SimpleNamespace(preprocessing=pre, source={}, config=None), "photos", data_dir=photos, batch_size=4
    )
    [batch] = list(loader)
    assert batch["mask"].tolist() == [True, True, False, False] and sorted(batch["label"][:2].tolist()) == [0, 1]
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    for image, label in zip(batch["image"][:2], batch["label"][:2]):
        expected = transform(photo(label)).numpy().transpose(1, 2, 0)  # normalized CHW -> HWC
        assert image.shape == expected.shape == (pre.crop_size, pre.crop_size, 3)
        np.testing.assert_allclose(image * std + mean, expected * std + mean, rtol=0, atol=1 / 255 + 1e-5)
        pixels = preprocess(photo(label), pre.resize_size, pre.crop_size, pre.interpolation)
        np.testing.assert_array_equal(image, normalize(pixels[None], pre.mean, pre.std)[0])  # predict's input
        if pre.interpolation == "bicubic":  # the check can fail: the bilinear resize is further from timm's
            bilinear = preprocess(photo(label), pre.resize_size, pre.crop_size, "bilinear") / 255.0
            assert np.abs(bilinear - (expected * std + mean)).max() > 2 / 255


def test_evaluate_with_a_timm_tag_runs_and_reports_its_bicubic_preset(photos, tmp_path, capsys):
    """`python -m resnext_jax.evaluate model.safetensors --model resnet18.a1_in1k`: the accuracy pass's loss is
    the model's on the bicubic pixels (not the bilinear ones), and report.json and report.md say bicubic."""
    import optax
    import safetensors  # noqa: F401  (timm depends on it)
    import timm
    from safetensors.torch import save_file

    from resnext_jax.evaluate import main as evaluate_main
    from resnext_jax.inference import load_model

    weights = tmp_path / "model.safetensors"
    state = timm.create_model("resnet18", num_classes=2).state_dict()
    save_file({key: value.contiguous() for key, value in state.items()}, weights)
    out = tmp_path / "report"
    # float32 convolutions on both sides (a GPU's default TF32 would blur the comparison of losses below).
    with jax.default_matmul_precision("highest"):
        code = run_cli(
            evaluate_main,
            [
                str(weights),
                "--model",
                "resnet18.a1_in1k",
                "--dataset",
                "photos",
                "--data-dir",
                photos,
                "--batch",
                "2",
                "--batch-sizes",
                "1",
                "--min-seconds",
                "0.01",
                "--out",
                str(out),
            ],
        )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    pre = preset("resnet18.a1_in1k")
    assert report["preprocessing"] == {
        "resize_size": 235,
        "crop_size": 224,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": "bicubic",
    }
    assert "- preprocessing: resize 235 (bicubic), crop 224," in (out / "report.md").read_text()
    assert report["accuracy"]["count"] == 2

    loaded = load_model(str(weights), model="resnet18.a1_in1k")

    def loss(interpolation):
        pixels = np.stack([preprocess(photo(label), 235, 224, interpolation) for label in (0, 1)])
        logits = loaded.module.apply(loaded.variables, normalize(pixels, pre.mean, pre.std), train=False)
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(2)).mean())

    with jax.default_matmul_precision("highest"):
        bicubic, bilinear = loss("bicubic"), loss("bilinear")
    # Measured on CPU: 3e-8 from the bicubic loss, 6e-5 between the two (this random model barely tells the photos
    # apart, so its loss is near log 2).
    tolerance = 2e-6 * max(1.0, abs(bicubic))
    assert abs(report["accuracy"]["loss"] - bicubic) < tolerance < abs(bicubic - bilinear)
