"""Test data in the real formats for the prepare tests: image folders of coloured shapes, CIFAR binary archives,
tars; and the checks both prepare test files share."""

import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from resnext_jax.data import dataset_info, datasets
from resnext_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "square", "triangle")
COLOURS = ((230, 40, 40), (40, 200, 40), (40, 60, 230))


def shape_image(label: int, rng: np.random.Generator, size=(40, 36)) -> Image.Image:
    """A learnable image: a dark noisy background with a coloured circle, square or triangle somewhere on it."""
    background = rng.integers(0, 70, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, 12, 2))
    box = [x, y, x + 22, y + 20]
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[label]) + rng.integers(-25, 25, 3), 0, 255))
    if label == 0:
        draw.ellipse(box, fill=colour)
    elif label == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, y + 20), (x + 22, y + 20), (x + 11, y)], fill=colour)
    return image


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def make_folder(root, per_class=20, seed=0) -> dict[str, tuple[int, bytes]]:
    """Writes root/<class>/<i>.jpg|png (JPEG and PNG alternate); returns {relative path: (label, bytes)}."""
    rng = np.random.default_rng(seed)
    files = {}
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(per_class):
            extension, format = ("jpg", "JPEG") if index % 2 else ("png", "PNG")
            relative = f"{name}/{index:03d}.{extension}"
            data = encoded(shape_image(label, rng), format)
            with open(os.path.join(root, relative), "wb") as file:
                file.write(data)
            files[relative] = (label, data)
    return files


def read_split(name, data_dir, split) -> list[dict]:
    source = datasets.open_source(name, split, data_dir)
    return [source[index] for index in range(len(source))]


def md5_validation(files: dict, fraction: float) -> set[str]:
    """The split rule written out independently: per class, the round(fraction * n) smallest md5s of the path."""
    expected = set()
    for label in range(len(CLASSES)):
        paths = sorted(
            (path for path, (lab, _) in files.items() if lab == label),
            key=lambda path: hashlib.md5(path.encode()).hexdigest(),
        )
        expected |= set(paths[: max(1, round(fraction * len(paths)))])
    return expected


def cifar_archive(path, name, num_train, num_test, seed=0):
    """A CIFAR binary archive in the real layout; returns {split: (labels, coarse labels, images (N,32,32,3))}."""
    rng = np.random.default_rng(seed)
    num_classes, folder = (10, "cifar-10-batches-bin") if name == "cifar10" else (100, "cifar-100-binary")
    truth, members = {}, {}
    for split, count in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, num_classes, count, dtype=np.uint8)
        coarse = rng.integers(0, 20, count, dtype=np.uint8)
        pixels = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)  # stored as R, G, B planes
        heads = [labels[:, None]] if name == "cifar10" else [coarse[:, None], labels[:, None]]
        records = np.concatenate(heads + [pixels.reshape(count, -1)], axis=1).tobytes()
        truth[split] = (labels, coarse, pixels.transpose(0, 2, 3, 1))
        if name == "cifar10" and split == "train":
            size = len(records) // 5
            for batch in range(5):
                members[f"{folder}/data_batch_{batch + 1}.bin"] = records[batch * size : (batch + 1) * size]
        else:
            members[f"{folder}/{'test_batch.bin' if name == 'cifar10' else split + '.bin'}"] = records
    if name == "cifar10":
        members[f"{folder}/batches.meta.txt"] = "\n".join(f"class{i}" for i in range(10)).encode() + b"\n\n"
    else:
        members[f"{folder}/fine_label_names.txt"] = "\n".join(f"fine{i}" for i in range(100)).encode()
        members[f"{folder}/coarse_label_names.txt"] = "\n".join(f"coarse{i}" for i in range(20)).encode()
    write_tar(path, members, "w:gz")
    return truth


def write_tar(path, members: dict, mode: str) -> None:
    target = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": path}
    with tarfile.open(mode=mode, **target) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def cmyk_jpeg(rng) -> bytes:
    return encoded(shape_image(0, rng).convert("CMYK"), "JPEG")


def assert_nothing_loads(name, data_dir):
    with pytest.raises(UserError):
        dataset_info(name, str(data_dir))
    leftovers = [path for path, _, _ in os.walk(data_dir) if ".incomplete-" in path]
    assert not leftovers, leftovers
