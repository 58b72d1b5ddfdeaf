"""`digits`: a TFDS builder for scikit-learn's bundled 8x8 digits, upsampled to 32x32 RGB.

It needs no network and no TensorFlow: scikit-learn ships the data, the images are handed to TFDS as encoded
PNG bytes (numpy arrays would go through TensorFlow's encoder), and the files are written as ArrayRecord.
It lives in a package folder, not a plain module, because tensorflow-datasets 4.9.10 fails to prepare builders
defined in a plain module file (see docs/data.md).

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


def digits_images_and_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (images uint8 (1797, 32, 32, 3) NHWC, labels int64 (1797,), is_test bool (1797,)).

  This is the exact content the builder writes, so tests can compare the loaded dataset against it.
  """
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.stack([
      np.asarray(Image.fromarray(im, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
      for im in small
  ])
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


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as 32x32 RGB PNGs, with a fixed train/test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from scikit-learn's package data.
    images, labels, is_test = digits_images_and_labels()
    return {
        "train": self._generate_examples(images, labels, np.flatnonzero(~is_test)),
        "test": self._generate_examples(images, labels, np.flatnonzero(is_test)),
    }

  def _generate_examples(self, images, labels, indices):
    from tqdm import tqdm

    for index in tqdm(indices, desc="digits", leave=False):
      yield int(index), {"image": _png_bytes(images[index]), "label": int(labels[index])}
