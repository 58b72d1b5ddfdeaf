"""RandAugment and the AutoAugment ImageNet policy on PIL images, numerically identical to torchvision's.

The op table, magnitude bins and the inverse affine matrix follow torchvision.transforms.autoaugment, so a
recipe tuned with torchvision behaves the same here; tests/test_transforms.py compares every op with torchvision.
Randomness comes from a numpy Generator (grain hands one to each record), not from torch's global RNG.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_FILL = (0, 0, 0)


def _inverse_affine_matrix(center, angle, translate, shear) -> list[float]:
    # torchvision.transforms.functional._get_inverse_affine_matrix with scale=1: PIL's transform wants the map
    # from output to input pixels.
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


def _affine(image: Image.Image, center, translate=(0, 0), shear=(0.0, 0.0)) -> Image.Image:
    matrix = _inverse_affine_matrix(center, 0.0, translate, shear)
    return image.transform(image.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=_FILL)


def apply_op(image: Image.Image, op_name: str, magnitude: float) -> Image.Image:
    """Applies one AutoAugment op to an RGB PIL image, like torchvision's `_apply_op` with NEAREST and fill 0."""
    width, height = image.size
    if op_name == "ShearX":
        return _affine(image, (0, 0), shear=(math.degrees(math.atan(magnitude)), 0.0))
    if op_name == "ShearY":
        return _affine(image, (0, 0), shear=(0.0, math.degrees(math.atan(magnitude))))
    if op_name == "TranslateX":
        return _affine(image, (width * 0.5, height * 0.5), translate=(int(magnitude), 0))
    if op_name == "TranslateY":
        return _affine(image, (width * 0.5, height * 0.5), translate=(0, int(magnitude)))
    if op_name == "Rotate":
        return image.rotate(magnitude, Image.NEAREST, False, None, fillcolor=_FILL)
    if op_name == "Brightness":
        return ImageEnhance.Brightness(image).enhance(1.0 + magnitude)
    if op_name == "Color":
        return ImageEnhance.Color(image).enhance(1.0 + magnitude)
    if op_name == "Contrast":
        return ImageEnhance.Contrast(image).enhance(1.0 + magnitude)
    if op_name == "Sharpness":
        return ImageEnhance.Sharpness(image).enhance(1.0 + magnitude)
    if op_name == "Posterize":
        return ImageOps.posterize(image, int(magnitude))
    if op_name == "Solarize":
        return ImageOps.solarize(image, magnitude)
    if op_name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if op_name == "Equalize":
        return ImageOps.equalize(image)
    if op_name == "Invert":
        return ImageOps.invert(image)
    if op_name == "Identity":
        return image
    raise ValueError(f"Unknown augmentation op {op_name!r}.")


def _magnitudes(num_bins: int, width: int, height: int) -> dict[str, tuple[np.ndarray, bool]]:
    # (magnitude per bin, whether the sign is randomized), as in torchvision's _augmentation_space.
    linspace = lambda stop: np.linspace(0.0, stop, num_bins, dtype=np.float32)  # noqa: E731
    return {
        "ShearX": (linspace(0.3), True),
        "ShearY": (linspace(0.3), True),
        "TranslateX": (linspace(150.0 / 331.0 * width), True),
        "TranslateY": (linspace(150.0 / 331.0 * height), True),
        "Rotate": (linspace(30.0), True),
        "Brightness": (linspace(0.9), True),
        "Color": (linspace(0.9), True),
        "Contrast": (linspace(0.9), True),
        "Sharpness": (linspace(0.9), True),
        "Posterize": (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)).astype(np.int32), False),
        "Solarize": (np.linspace(255.0, 0.0, num_bins, dtype=np.float32), False),
        "AutoContrast": (np.zeros(()), False),
        "Equalize": (np.zeros(()), False),
    }


_RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)


def rand_augment(
    image: Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31
) -> Image.Image:
    """RandAugment (Cubuk et al. 2019) with torchvision's defaults: `num_ops` ops drawn uniformly, fixed magnitude."""
    table = _magnitudes(num_magnitude_bins, *image.size)
    for _ in range(num_ops):
        op_name = _RANDAUGMENT_OPS[rng.integers(len(_RANDAUGMENT_OPS))]
        if op_name == "Identity":
            continue
        values, signed = table[op_name]
        value = float(values[magnitude]) if values.ndim > 0 else 0.0
        if signed and rng.integers(2):
            value = -value
        image = apply_op(image, op_name, value)
    return image


# torchvision's AutoAugmentPolicy.IMAGENET: sub-policies of two (op, probability, magnitude bin) each.
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def auto_augment_imagenet(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """AutoAugment's ImageNet policy (Cubuk et al. 2018): one random sub-policy, each op with its probability."""
    table = _magnitudes(10, *image.size)
    for op_name, probability, magnitude_bin in IMAGENET_POLICY[rng.integers(len(IMAGENET_POLICY))]:
        if rng.random() > probability:
            continue
        values, signed = table.get(op_name, (np.zeros(()), False))
        value = float(values[magnitude_bin]) if magnitude_bin is not None and values.ndim > 0 else 0.0
        if signed and rng.integers(2):
            value = -value
        image = apply_op(image, op_name, value)
    return image
