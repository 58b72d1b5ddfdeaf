"""Per-image transforms against torchvision, on scikit-learn's two sample photos."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import autoaugment as tv_autoaugment
from torchvision.transforms import functional as TF
from torchvision.transforms._presets import ImageClassification

from resnext_jax.data import autoaugment, loaders
from resnext_jax.data import transforms as T
from resnext_jax.errors import InputError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTOS = load_sample_images().images  # china.jpg and flower.jpg, 427x640


def _encode(image: Image.Image, format_: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("resize_size", [256, 232])
@pytest.mark.parametrize("photo", [0, 1])
def test_eval_transform_matches_torchvision_preset(photo, resize_size):
    preset = ImageClassification(crop_size=224, resize_size=resize_size)
    ours = T.normalize(T.eval_transform(PHOTOS[photo], resize_size, 224), MEAN, STD)
    std = np.asarray(STD)
    # torchvision on PIL input (what ImageFolder-style loaders feed it): identical up to float rounding.
    from_pil = preset(Image.fromarray(PHOTOS[photo])).permute(1, 2, 0).numpy()
    assert np.abs((ours - from_pil) * std).max() < 1e-6
    # torchvision on a uint8 tensor resizes with torch's own antialiased kernel: within one gray level.
    from_tensor = preset(torch.from_numpy(PHOTOS[photo].copy()).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.abs((ours - from_tensor) * std).max() <= 1 / 255 + 1e-5


@pytest.mark.parametrize("photo", [0, 1])
def test_one_resize_serves_bilinear_and_bicubic_presets(photo):
    """ "bicubic" is torchvision's Resize(size, BICUBIC) on PIL, which timm's eval transform calls; the default stays
    the bilinear that training and torchvision's presets use, and an unknown filter fails once, at construction."""
    image = Image.fromarray(PHOTOS[photo])
    bicubic = TF.center_crop(TF.resize(image, 235, interpolation=TF.InterpolationMode.BICUBIC), 224)
    np.testing.assert_array_equal(T.eval_transform(image, 235, 224, "bicubic"), np.asarray(bicubic))
    bilinear = TF.center_crop(TF.resize(image, 235, interpolation=TF.InterpolationMode.BILINEAR), 224)
    np.testing.assert_array_equal(T.eval_transform(image, 235, 224), np.asarray(bilinear))
    assert np.abs(np.asarray(bicubic, np.int16) - np.asarray(bilinear, np.int16)).max() > 2
    record = {"image": _encode(image, "PNG"), "label": 0, "mask": True}
    np.testing.assert_array_equal(loaders._EvalTransform(235, 224, "bicubic").map(record)["image"], bicubic)
    with pytest.raises(InputError, match=r"interpolation 'lanczos' is not supported; use one of \['bilinear', "):
        loaders._EvalTransform(235, 224, "lanczos")


def test_resized_crop_matches_torchvision_for_a_given_box():
    image = Image.fromarray(PHOTOS[1])
    for box in [(10, 20, 300, 200), (0, 0, 640, 427), (600, 400, 40, 27)]:
        left, top, width, height = box
        want = np.asarray(TF.resized_crop(image, top, left, height, width, [224, 224]))
        np.testing.assert_array_equal(np.asarray(T.resized_crop(image, box, 224)), want)


def test_random_resized_crop_box_follows_torchvision_distribution():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    ours = np.array([T.random_resized_crop_box(640, 427, rng) for _ in range(3000)], np.float64)
    theirs = np.array([torchvision_params(torch.empty(3, 427, 640)) for _ in range(3000)], np.float64)
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 640).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 427).all()
    area_ours, area_theirs = ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]
    assert abs(area_ours.mean() - area_theirs.mean()) / area_theirs.mean() < 0.05
    ratio_ours, ratio_theirs = np.log(ours[:, 2] / ours[:, 3]), np.log(theirs[:, 2] / theirs[:, 3])
    assert abs(ratio_ours.mean() - ratio_theirs.mean()) < 0.03 and abs(ratio_ours.std() - ratio_theirs.std()) < 0.02


def torchvision_params(image):
    from torchvision.transforms import RandomResizedCrop

    top, left, height, width = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
    return left, top, width, height


def test_jpeg_draft_decoding_crops_the_same_region():
    # Decoding a JPEG at reduced scale must still crop the same part of the photo: compare with a full decode.
    data = _encode(Image.fromarray(PHOTOS[0]), "JPEG", quality=95)
    for seed in range(5):
        fast = np.asarray(T.random_resized_crop(T.open_image(data), np.random.default_rng(seed), 64), np.float64)
        full = np.asarray(T.random_resized_crop(T.decode_image(data), np.random.default_rng(seed), 64), np.float64)
        assert np.abs(fast - full).mean() < 6.0  # a wrong region gives 50+


def _jpeg_variants() -> dict[str, bytes]:
    photo = Image.fromarray(PHOTOS[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": PIL ignores it, so a decoder that honours it would disagree
    return {
        "baseline": _encode(photo, "JPEG", quality=90),
        "progressive": _encode(photo, "JPEG", quality=80, progressive=True),
        "4:4:4": _encode(photo, "JPEG", quality=95, subsampling=0),
        "exif-rotated": _encode(photo, "JPEG", quality=90, exif=exif),
    }


@pytest.mark.parametrize("variant", ["baseline", "progressive", "4:4:4", "exif-rotated"])
def test_opencv_decode_gives_pils_pixels(variant):
    data = _jpeg_variants()[variant]
    pixels = T.decode_jpeg_with_opencv(T.open_image(data), data)
    np.testing.assert_array_equal(pixels, np.asarray(T.decode_image(data)))


def test_opencv_decode_leaves_other_images_to_pil():
    photo = Image.fromarray(PHOTOS[1]).resize((80, 60))
    jpeg = _encode(photo, "JPEG")
    for data in [
        _encode(photo.convert("L"), "JPEG"),
        _encode(photo.convert("CMYK"), "JPEG"),
        _encode(photo, "PNG"),
        jpeg[: len(jpeg) // 2],
    ]:
        assert T.decode_jpeg_with_opencv(T.open_image(data), data) is None


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_train_crop_from_bytes_is_torchvisions_resized_crop(jpeg_draft):
    # The whole train crop from encoded bytes (OpenCV decode, PIL resize) against torchvision on the PIL-decoded
    # photo with the same box: identical wherever no reduced-size decode happens (a 640x427 photo at size 224 is
    # never drafted, whatever the crop).
    data = _jpeg_variants()["baseline"]
    decoded = T.decode_image(data)
    for seed in range(8):
        ours = T.random_resized_crop(
            T.open_image(data), np.random.default_rng(seed), 224, data=data, jpeg_draft=jpeg_draft
        )
        left, top, width, height = T.random_resized_crop_box(640, 427, np.random.default_rng(seed))
        want = np.asarray(TF.resized_crop(decoded, top, left, height, width, [224, 224]))
        np.testing.assert_array_equal(np.asarray(ours), want)


@pytest.mark.parametrize(
    "op_name,magnitude",
    [
        ("ShearX", 0.3),
        ("ShearY", -0.2),
        ("TranslateX", 40.0),
        ("TranslateY", -33.0),
        ("Rotate", 25.0),
        ("Brightness", 0.5),
        ("Color", -0.6),
        ("Contrast", 0.9),
        ("Sharpness", 0.7),
        ("Posterize", 5),
        ("Solarize", 128.0),
        ("AutoContrast", 0.0),
        ("Equalize", 0.0),
        ("Invert", 0.0),
    ],
)
def test_augmentation_ops_match_torchvision(op_name, magnitude):
    image = Image.fromarray(PHOTOS[1]).resize((96, 64))
    want = tv_autoaugment._apply_op(image, op_name, magnitude, TF.InterpolationMode.NEAREST, None)
    np.testing.assert_array_equal(np.asarray(autoaugment.apply_op(image, op_name, magnitude)), np.asarray(want))


def test_randaugment_magnitudes_match_torchvision():
    ours = autoaugment._magnitudes(31, 96, 64)
    theirs = tv_autoaugment.RandAugment()._augmentation_space(31, (64, 96))
    assert set(ours) == set(theirs) - {"Identity"}
    for name, (values, signed) in ours.items():
        np.testing.assert_allclose(values, theirs[name][0].numpy(), rtol=1e-6)
        assert signed == theirs[name][1]


def test_autoaugment_policy_is_torchvision_imagenet():
    policy = tv_autoaugment.AutoAugment(tv_autoaugment.AutoAugmentPolicy.IMAGENET).policies
    assert [tuple(map(tuple, sub)) for sub in policy] == list(autoaugment.IMAGENET_POLICY)


@pytest.mark.parametrize(
    "transform,augment",
    [
        ("imagenet", None),
        ("imagenet", "randaugment"),
        ("imagenet", "autoaugment"),
        ("resize_crop", None),
        ("cifar", None),
        ("none", None),
    ],
)
def test_train_transforms_keep_dtype_shape_and_range(transform, augment):
    size = 32 if transform == "cifar" else 96
    data = _encode(Image.fromarray(PHOTOS[0]), "JPEG", quality=90)
    step = loaders._TrainTransform(transform, size, augment)
    outputs = [step.random_map({"image": data, "label": 3}, np.random.default_rng(seed))["image"] for seed in range(4)]
    for output in outputs:
        assert output.dtype == np.uint8 and output.shape == (size, size, 3)
        assert 0 < output.mean() < 255
    if transform != "none":  # a random transform must actually vary with the seed
        assert len({output.tobytes() for output in outputs}) > 1


def _bad_and_odd_images() -> dict[str, bytes]:
    photo = Image.fromarray(PHOTOS[1]).resize((80, 60))
    jpeg = _encode(photo, "JPEG")
    return {
        "grayscale": _encode(photo.convert("L"), "PNG"),
        "cmyk": _encode(photo.convert("CMYK"), "JPEG"),
        "rgba": _encode(photo.convert("RGBA"), "PNG"),
        "palette": _encode(photo.convert("P"), "PNG"),
        "truncated": jpeg[: len(jpeg) // 2],
        "garbage": b"this is not an image",
    }


def test_odd_modes_are_converted_and_bad_files_are_skipped_with_a_count(caplog):
    images = _bad_and_odd_images()
    step = loaders._TrainTransform("imagenet", 48, None)
    before = loaders.bad_image_count()
    results = {
        name: step.random_map({"image": data, "label": 1}, np.random.default_rng(0)) for name, data in images.items()
    }
    for name in ("grayscale", "cmyk", "rgba", "palette"):
        assert results[name]["image"].shape == (48, 48, 3), name
    gray = results["grayscale"]["image"]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # replicated, not a false-colour decode
    assert results["truncated"] is None and results["garbage"] is None
    assert loaders.bad_image_count() == before + 2
    assert "bad image" in caplog.text
    # Eval never drops: the bad image becomes a masked-out zero image.
    evaluated = loaders._EvalTransform(56, 48).map({"image": images["truncated"], "label": 2, "mask": True})
    assert not evaluated["mask"] and evaluated["image"].shape == (48, 48, 3)


def test_bad_images_do_not_end_the_epoch():
    import grain.python as grain

    good = _encode(Image.fromarray(PHOTOS[0]).resize((64, 48)), "PNG")
    records = [{"image": good, "label": index} for index in range(6)]
    records[2]["image"] = _bad_and_odd_images()["truncated"]
    loader = grain.DataLoader(
        data_source=records,
        sampler=grain.IndexSampler(6, shuffle=False, num_epochs=1, seed=0),
        operations=[loaders._TrainTransform("imagenet", 32, None), loaders._DropBad(), grain.Batch(5)],
    )
    (batch,) = list(loader)
    assert sorted(batch["label"].tolist()) == [0, 1, 3, 4, 5]


def test_pad_crop_flip_is_a_shifted_window():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for seed in range(6):
        out = T.pad_crop_flip(image, np.random.default_rng(seed))
        windows = [padded[top : top + 32, left : left + 32] for top in range(9) for left in range(9)]
        assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)


def test_normalize_matches_torchvision():
    image = PHOTOS[0][:50, :60]
    want = TF.normalize(TF.to_tensor(image), MEAN, STD).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(T.normalize(image, MEAN, STD), want, atol=1e-5)
    assert math.isclose(
        float(T.normalize(np.full((1, 1, 3), 255, np.uint8), MEAN, STD)[0, 0, 0]), (1 - MEAN[0]) / STD[0], rel_tol=1e-6
    )


def test_normalize_of_a_batch_matches_float64_and_flipped_views():
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 20, 3), dtype=np.uint8)
    want = (images / 255.0 - np.asarray(MEAN)) / np.asarray(STD)  # float64 reference
    got = T.normalize(images, MEAN, STD)
    assert got.dtype == np.float32 and got.shape == images.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # Non-contiguous input (a flipped view, as the train transform returns) normalizes to the flipped output.
    np.testing.assert_array_equal(T.normalize(images[:, :, ::-1], MEAN, STD), got[:, :, ::-1])
