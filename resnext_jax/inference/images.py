"""Reading the user's own image files safely, and the model's eval preset applied to them.

The preset is `resnext_jax.data.transforms.eval_transform` and `normalize`, the functions the eval loader runs,
so a photo gives the same input here as in evaluation: torchvision's `ImageClassification` pixels, or timm's
eval transform's for a timm weight's bicubic preset.

A bad file raises `ImageReadError` with one line that says what is wrong with it: missing or unreadable, empty,
not an image, truncated, or above the pixel limit. Two kinds of files that decode but would come out wrong are
converted with care instead, by the loaders' own `transforms.to_rgb`: palette images with transparency go through
RGBA (PIL would warn), and 16-bit and float images are scaled to 8 bits with a note (PIL's plain RGB conversion
saturates every value above 255 to white, and turns a 0..1 float image black).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import warnings

import numpy as np
from PIL import Image

from resnext_jax.data import transforms as T
from resnext_jax.errors import UserError

# 100 megapixels: above any camera's photo (a 20000x20000 image is 400 MP) and 300 MB once decoded. PIL's own
# decompression-bomb guard (89 MP warns, 179 MP raises) is replaced by this check, made on the header only.
DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(UserError):
    """One image file cannot be used; the message (without the path) says why."""


@contextlib.contextmanager
def _pil_pixel_guard_off():
    """PIL's bomb check raises from inside `Image.open`; ours runs right after it, with the size in the message."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image(
    path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, resize_size: int | None = None
) -> tuple[Image.Image, list[str]]:
    """Decodes `path` into an RGB PIL image; returns it with notes on conversions worth knowing about.

    `resize_size` (the preset's shorter side) lets the check refuse images whose resized copy would exceed
    `max_pixels` as well (a 1 x 100000 strip is small but resizes to 256 x 25600000).

    Raises:
      ImageReadError: the file is missing, unreadable, empty, not an image, truncated or too large.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ImageReadError(f"cannot read the file ({error.strerror or error})") from error
    if not data:
        raise ImageReadError("the file is empty (0 bytes)")
    with _pil_pixel_guard_off():
        try:
            image = Image.open(io.BytesIO(data))
        except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError or ValueError
            raise ImageReadError("not an image that PIL can read") from error
        width, height = image.size
        if width * height > max_pixels:
            raise ImageReadError(
                f"{width}x{height} is {width * height / 1e6:.0f} megapixels, above the "
                f"{max_pixels / 1e6:.0f} MP limit; shrink it or raise the limit (--max-pixels)"
            )
        if resize_size and width and height:
            short, long = min(width, height), max(width, height)
            if resize_size * resize_size * long / short > max_pixels:
                raise ImageReadError(
                    f"{width}x{height} is too elongated: resized to a shorter side of "
                    f"{resize_size} it would exceed the {max_pixels / 1e6:.0f} MP limit; crop it"
                )
        try:
            image.load()
        except Exception as error:  # OSError ('image file is truncated'), SyntaxError, ValueError by codec
            raise ImageReadError(f"truncated or corrupt {image.format or 'image'} data ({error})") from error
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """The decoder training and evaluation use (`transforms.to_rgb`), so a file predicts as it trained."""
    return T.to_rgb(image)


def preprocess(image: Image.Image, resize_size: int, crop_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The eval preset's geometry, `transforms.eval_transform` itself: uint8 (crop_size, crop_size, 3).

    Bilinear is exactly `create_eval_loader`'s (torchvision's presets). "bicubic" is timm's eval transform for
    most of its weights: `create_transform(**resolve_data_config({}, model=...))` resizes the shorter side to
    `floor(crop_size / crop_pct)` (the `resize_size` of `resnext_jax.models.pretrained.PretrainedConfig`) with PIL's
    bicubic filter, then center-crops; the same pixels as timm's, before its `ToTensor` and `Normalize`.

    Raises:
      InputError: an interpolation other than "bilinear" or "bicubic" (the message names them).
    """
    return T.eval_transform(image, resize_size, crop_size, interpolation)


def normalize(batch: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (B, H, W, 3) -> the model's float32 input, with the loaders' arithmetic (`transforms.normalize`)."""
    return T.normalize(batch, mean, std)


def find_images(patterns: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expands files, folders (searched recursively for image extensions) and globs, in the order given.

    Returns (paths, problems): problems are (pattern, message) for arguments that match nothing. An explicit file
    is kept whatever its extension (reading it says if it is not an image); duplicates are dropped.
    """
    paths, problems, seen = [], [], set()

    def add(path):
        if path not in seen:
            seen.add(path)
            paths.append(path)

    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                problems.append((pattern, f"the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            for path in found:
                add(path)
        elif os.path.lexists(pattern) or not glob.has_magic(pattern):
            add(pattern)  # reading it reports a missing, dangling or unreadable path
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                problems.append((pattern, "the pattern matches no files"))
            for path in matches:
                if os.path.isdir(path):
                    continue
                add(path)
    return paths, problems
