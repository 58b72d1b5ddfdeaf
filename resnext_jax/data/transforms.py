"""Per-image transforms on PIL images and uint8 numpy arrays (HWC, RGB).

PIL does the resizing because its bilinear filter is the antialiased one that torchvision's presets use on PIL
input, so `eval_transform` reproduces torchvision's `ImageClassification` preset exactly, and with "bicubic" the
eval transform timm builds for most of its weights (`create_transform(**resolve_data_config(...))`). OpenCV only
decodes full-size RGB JPEGs for the train crop (`random_resized_crop` with `data`): the same libjpeg-turbo pixels
as PIL, about 20% faster. Every random transform takes a numpy Generator, which grain seeds per record; that is
what makes a restored iterator replay the same augmentations. Normalization happens once per batch in `normalize`.
"""

import io
import math

import cv2
import numpy as np
from PIL import Image

from resnext_jax.errors import InputError

# One thread per process: the loaders parallelize over worker processes, and OpenCV's own pool would fight them.
cv2.setNumThreads(1)


class BadImageError(ValueError):
    """Raised when bytes cannot be decoded into an image (truncated, corrupt or not an image)."""


# Integer modes wider than 8 bits: PIL's convert("RGB") clips them at 255, so a 16-bit PNG came out all white.
_WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image) -> tuple[Image.Image, list[str]]:
    """The one conversion from any image PIL opens (or a uint8 HWC array) to the RGB pixels that training, eval,
    prepare's statistics and predict all use; returns the RGB image and notes on conversions worth knowing about.

    8-bit modes convert as torchvision's ImageFolder loader does (`convert("RGB")`): alpha is dropped, CMYK,
    YCbCr, bilevel and grayscale become RGB, and a palette with transparency goes through RGBA (the same pixels,
    without PIL's warning). Wider modes are scaled, with a note: 16-bit grayscale (0..65535) and 32-bit integers
    above 255 to 0..255, 32-bit float (mode F) from 0..1 (or 0..255, or 0..65535 when larger; NaN becomes 0).
    EXIF orientation is ignored everywhere, as PIL, torchvision and the OpenCV decode path ignore it.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in _WIDE_INTEGER_MODES or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = np.where(np.isfinite(array), array, 0.0)
        peak = float(array.max()) if array.size else 0.0
        if image.mode == "F":
            scale, note = (255.0, "0..1") if peak <= 1.0 else (1.0, "0..255") if peak <= 255 else (255 / 65535, "")
            note = f"32-bit float{' in ' + note if note else ''}, scaled to 8 bits"
        elif image.mode.startswith("I;16") or peak > 255:
            scale, note = 255.0 / 65535.0, "16-bit grayscale, scaled to 8 bits"
        else:
            scale, note = 1.0, None  # a 32-bit integer image that holds 8-bit values
        gray = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)), [note] if note else []
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct P -> RGB conversion gives the same pixels but warns
    return (image if image.mode == "RGB" else image.convert("RGB")), []


def to_pil(image) -> Image.Image:
    """`to_rgb` without the notes: an RGB PIL image from a PIL image of any mode or a uint8 HWC array."""
    return to_rgb(image)[0]


def open_image(data: bytes) -> Image.Image:
    """Opens encoded bytes lazily (the pixels are decoded on first use, so a JPEG draft can still be set)."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as error:
        raise BadImageError(f"not a readable image ({error})") from error


def decode_image(data: bytes) -> Image.Image:
    """Decodes encoded bytes into an RGB PIL image, raising BadImageError for truncated or corrupt data."""
    image = open_image(data)
    try:
        image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError or ValueError depending on the codec.
        raise BadImageError(f"cannot decode image ({error})") from error
    return to_pil(image)


# PIL's filters by the names presets use (torchvision's `InterpolationMode` values, timm's `interpolation` strings).
# Both are antialiased when they shrink: PIL widens the filter's support by the scale factor.
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resample_filter(interpolation: str) -> int:
    """PIL's filter for `interpolation`; an InputError naming the choices for anything else (e.g. "lanczos")."""
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation {interpolation!r} is not supported; use one of {list(INTERPOLATIONS)}")
    return INTERPOLATIONS[interpolation]


def resize_shorter_side(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resizes so the shorter side is `size`, exactly like torchvision's `Resize(size)` on PIL input.

    timm's eval transform calls that same `Resize(size)` (with its bicubic for most weights), so one function serves
    both presets: the longer side is truncated to int(size * long / short), and a shorter side already at `size`
    leaves the image untouched.
    """
    resample = resample_filter(interpolation)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crops the central `size` x `size` square, with torchvision's rounding of the offsets."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"image {width}x{height} is smaller than the crop {size}; resize it first.")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_transform(image, resize_size: int, crop_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resizes the shorter side to `resize_size` and center-crops `crop_size`: torchvision's or timm's eval preset.

    Args:
      image: a PIL image or a uint8 (H, W, 3) array.
      resize_size: 256 for V1-style weights, 232 for V2-style weights, as in torchvision's weight metadata; for timm
        weights floor(crop_size / crop_pct).
      crop_size: usually 224.
      interpolation: "bilinear" (torchvision's presets, and what training runs evaluate with) or "bicubic" (most
        timm weights).

    Returns:
      uint8 (crop_size, crop_size, 3).
    """
    image = resize_shorter_side(to_pil(image), resize_size, interpolation)
    return np.asarray(center_crop(image, crop_size))


def resize_to(image, size: int) -> np.ndarray:
    """Resizes to `size` x `size`, ignoring the aspect ratio; returns uint8 (size, size, 3)."""
    image = to_pil(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image)


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)
) -> tuple[int, int, int, int]:
    """Returns (left, top, crop_width, crop_height) drawn with torchvision's RandomResizedCrop.get_params algorithm.

    Ten tries at a random area and log-uniform aspect ratio; if none fits, a central crop clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """Crops `box` = (left, top, width, height) and resizes it to `size` x `size` (bilinear, antialiased)."""
    left, top, crop_width, crop_height = box
    # crop() before resize(), not resize(box=...): the box form lets the filter read pixels outside the crop, which
    # changes the edges and breaks parity with torchvision.
    return image.crop((left, top, left + crop_width, top + crop_height)).resize((size, size), Image.BILINEAR)


def decode_jpeg_with_opencv(image: Image.Image, data: bytes) -> np.ndarray | None:
    """Decodes `data`, opened lazily as `image`, into uint8 (H, W, 3) RGB with OpenCV, or returns None.

    Only complete RGB JPEGs qualify, and for them the pixels are PIL's (both run libjpeg-turbo's default accurate
    IDCT and fancy upsampling; a test checks). Everything else returns None and stays with PIL, so grayscale, CMYK
    and palette images convert exactly as before, and a truncated file (no end-of-image marker at the end) still
    raises in PIL (OpenCV 5 rejects it too, but OpenCV 4 returned it gray-filled with a warning).
    """
    if image.format != "JPEG" or image.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return None
    # PIL ignores EXIF orientation, so OpenCV must too, or rotated photos would crop differently.
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


def random_resized_crop(
    image,
    rng: np.random.Generator,
    size: int,
    scale=(0.08, 1.0),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    data: bytes | None = None,
    jpeg_draft: bool = True,
) -> Image.Image:
    """torchvision's RandomResizedCrop(size, scale, ratio) on a PIL image or uint8 array; returns a PIL image.

    If `image` is a lazily opened JPEG (see `open_image`) and `jpeg_draft`, it is decoded at 1/2, 1/4 or 1/8 scale
    when the crop is at least that much larger than `size` (PIL's draft mode). That changes pixels slightly, not
    statistics, and saves decode time on large photos. Otherwise, if `data` (the encoded bytes of `image`) is
    given, `decode_jpeg_with_opencv` decodes it: same pixels as PIL, faster.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    width, height = image.size
    box = random_resized_crop_box(width, height, rng, scale, ratio)
    if image.format == "JPEG" and image.tile:  # still undecoded, so a reduced-size decode is possible
        left, top, crop_width, crop_height = box
        drafted = None
        if jpeg_draft:
            drafted = image.draft("RGB", (math.ceil(width * size / crop_width), math.ceil(height * size / crop_height)))
        if drafted is not None and drafted[1][2] < width:
            reduction = width / drafted[1][2]  # drafted[1] is the original frame in the reduced image's pixels
            left, top = round(left / reduction), round(top / reduction)
            crop_width = min(round(crop_width / reduction), image.size[0] - left)
            crop_height = min(round(crop_height / reduction), image.size[1] - top)
            box = (left, top, crop_width, crop_height)
        elif data is not None and (pixels := decode_jpeg_with_opencv(image, data)) is not None:
            # Image.fromarray copies only the crop, which is also what PIL's crop() would copy.
            image = Image.fromarray(pixels[top : top + crop_height, left : left + crop_width])
            box = (0, 0, crop_width, crop_height)
    return resized_crop(to_pil(image), box, size)


def random_resize_then_crop(image, rng: np.random.Generator, size: int, max_scale: float = 1.35) -> Image.Image:
    """Resizes the shorter side to a random length in [size, size * max_scale], then takes a random square crop.

    A common Imagenette recipe: milder than RandomResizedCrop, it never zooms in past `max_scale`.
    """
    image = to_pil(image)
    image = resize_shorter_side(image, int(rng.integers(size, int(size * max_scale) + 1)))
    width, height = image.size
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return image.crop((left, top, left + size, top + size))


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors a (H, W, C) array left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """CIFAR-style augmentation: zero-pad by `padding`, take a random crop of the original size, maybe flip."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, 2 * padding + 1))
    left = int(rng.integers(0, 2 * padding + 1))
    return random_horizontal_flip(padded[top : top + height, left : left + width], rng)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """Maps uint8 images (..., W, C) to float32 (x / 255 - mean) / std, with mean and std on the 0-1 scale."""
    images = np.asarray(images)
    width, channels = images.shape[-2:] if images.ndim >= 2 else (1, images.shape[-1])
    mean = np.tile(np.asarray(mean, np.float32) * 255.0, width)
    inv_std = np.tile(1.0 / (np.asarray(std, np.float32) * 255.0), width)
    # Broadcasting a (C,) vector makes numpy's inner loop C = 3 elements long, which made this 8x slower than the
    # same arithmetic over rows of W * C; writing into `out` also saves the float32 temporaries. Same bits either way.
    rows = images.reshape(-1, width * channels)
    out = np.empty(rows.shape, np.float32)
    np.subtract(rows, mean, out=out)
    np.multiply(out, inv_std, out=out)
    return out.reshape(images.shape)
