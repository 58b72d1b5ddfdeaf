"""`digits`: a dataset built from scikit-learn's bundled 8x8 digits, upsampled to 32x32 RGB.

It needs no network and no TensorFlow: scikit-learn ships the data, the images are encoded as PNG here, and
`resnext_jax.data.prepare.writer` writes them in TFDS's ArrayRecord layout.

Each 8x8 image (values 0..16) is scaled to 0..255 uint8, upsampled to 32x32 with PIL bilinear resizing (smooth
strokes look more like real images than nearest's blocks), and replicated to 3 channels. The split is fixed: a
permutation of the 1797 examples drawn with `numpy.random.default_rng(0)`; the first 1437 are `train` and the last
360 (20%) are `test`.
"""

import io

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_TEST = 360
SPLIT_SEED = 0
VERSION = "1.0.0"


def digits_images_and_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (images uint8 (1797, 32, 32, 3) NHWC, labels int64 (1797,), is_test bool (1797,)).

    This is the exact content the builder writes, so tests can compare the loaded dataset against it.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(im, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in small]
    )
    images = np.repeat(images[..., None], 3, axis=-1)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    is_test = np.zeros(len(images), dtype=bool)
    is_test[order[-NUM_TEST:]] = True
    return images, digits.target.astype(np.int64), is_test


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def build(data_dir: str) -> str:
    """Writes digits into `<data_dir>/digits/1.0.0` (once, in about a second) and returns that directory.

    It prints one line: TFDS's builder printed size warnings and nested progress bars for a one-second job. The
    examples, their features and their order (TFDS's key-hash order; keys are the example indices) are those TFDS's
    builder wrote, so a directory made by an older version reads the same.
    """
    import sys

    from resnext_jax.data.prepare.writer import DatasetWriter

    images, labels, is_test = digits_images_and_labels()
    print(f"Building the digits dataset once (offline, from scikit-learn) in {data_dir}", file=sys.stderr)
    with DatasetWriter(
        data_dir, "digits", VERSION, features(), description=__doc__, metadata={"source": "scikit-learn load_digits"}
    ) as writer:
        for split, indices in (("train", np.flatnonzero(~is_test)), ("test", np.flatnonzero(is_test))):
            split_writer = writer.split(split)
            for index in indices:
                split_writer.add(str(int(index)), {"image": _png_bytes(images[index]), "label": int(labels[index])})
    return writer.target


def features():
    """The TFDS features of digits: a 32x32x3 PNG and one of 10 labels."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
    )
