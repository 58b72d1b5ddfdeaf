"""Checking and encoding single images, run in worker processes while the main process writes.

A file is stored exactly as it was read (no re-encode), so checking it is the only decode preparing needs: an image
that PIL cannot decode to RGB here would fail in every epoch later. JPEGs are decoded at 1/8 scale (libjpeg still
reads every byte, so truncation is caught) and their per-channel statistics come from that small image, which is
why checking a 500x375 photo costs about a millisecond. Raw pixels (CIFAR) are encoded as PNG, as TFDS stores them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

# torchvision's ImageFolder extensions (IMG_EXTENSIONS); anything else in a class folder is ignored and counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The statistics use every 4th row and column of the checked image, plenty for a mean and std.
_STRIDE = 4


def is_image_name(name: str) -> bool:
    """Whether a file name has one of torchvision's image extensions (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def inspect_image(data: bytes) -> tuple[str | None, np.ndarray | None]:
    """Returns (None, stats) for an image PIL can decode to RGB, else (the problem, None).

    stats is float64 [sum R, G, B, sum of squares R, G, B, pixel count] on the 0-1 scale.
    """
    problem, stats, _ = _inspect(data)
    return problem, stats


def _inspect(data: bytes) -> tuple[str | None, np.ndarray | None, str | None]:
    """`inspect_image` plus the decoder's note (e.g. "16-bit grayscale, scaled to 8 bits"), or None."""
    from PIL import Image, UnidentifiedImageError

    from resnext_jax.data.transforms import to_rgb

    if not data:
        return "empty file (0 bytes)", None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency and EXIF notes are not problems
            with Image.open(io.BytesIO(data)) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                rgb, notes = to_rgb(image)  # the loaders' decoder, so the statistics are of their pixels
                rgb = np.asarray(rgb)
    except UnidentifiedImageError:
        return "not an image PIL can read", None, None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        return f"cannot be decoded ({error})", None, None
    return None, channel_stats(rgb), (notes[0] if notes else None)


def channel_stats(rgb: np.ndarray) -> np.ndarray:
    """[sum R, G, B, sum of squares R, G, B, pixel count] of a uint8 (H, W, 3) image, on the 0-1 scale."""
    pixels = rgb[::_STRIDE, ::_STRIDE].reshape(-1, 3).astype(np.float64) / 255.0
    return np.concatenate([pixels.sum(0), np.square(pixels).sum(0), [len(pixels)]])


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encodes a uint8 (H, W, 3) array as PNG (lossless, like TFDS's CIFAR)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def load_item(source) -> tuple[bytes | None, str | None, np.ndarray | None, str | None]:
    """Reads and checks one example's image: `source` is a file path (str), encoded bytes, or a uint8 (H, W, 3)
    array to encode as PNG. Returns (encoded bytes or None, problem or None, stats or None, the decoder's note on
    a scaled 16-bit or float image or None)."""
    if isinstance(source, np.ndarray):
        return png_bytes(source), None, channel_stats(source), None
    if isinstance(source, str):
        try:
            with open(source, "rb") as file:
                data = file.read()
        except OSError as error:
            return None, f"unreadable ({error.strerror or error})", None, None
    else:
        data = source
    problem, stats, note = _inspect(data)
    return (None if problem else data), problem, stats, note


def load_items(sources: list) -> list:
    """`load_item` over a chunk; a chunk per task keeps the inter-process overhead small. Bytes given are not sent
    back (the caller has them: `pipeline._loaded` puts them back), which halves the copying for archives."""
    results = []
    for source in sources:
        data, problem, stats, note = load_item(source)
        results.append((None if isinstance(source, bytes) else data, problem, stats, note))
    return results
