"""`python -m resnext_jax.data.prepare` on data the tests make in the real formats, read back by the loaders.

Every check compares against what the test itself generated: each file comes back exactly once, byte for byte,
with its label, and the split is the one an independent md5 rule gives. Bad input: test_prepare_bad_input.py.
"""

import collections
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prepared_data import (
    CLASSES,
    REPO,
    cifar_archive,
    cmyk_jpeg,
    encoded,
    make_folder,
    md5_validation,
    read_split,
    shape_image,
    write_tar,
)

from resnext_jax.data import create_eval_loader, dataset_info
from resnext_jax.data.prepare.archives import prepare_cifar, prepare_imagenette
from resnext_jax.data.prepare.folder import prepare_folder
from resnext_jax.data.prepare.imagenet import imagenet_labels, prepare_imagenet
from resnext_jax.data.transforms import decode_image
from resnext_jax.errors import UserError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "shapes")
    files = make_folder(root, per_class=30)
    with open(os.path.join(root, "circle", "notes.txt"), "w") as file:
        file.write("not an image")
    with open(os.path.join(root, "README.md"), "w") as file:
        file.write("not in a class folder")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    report = prepare_folder(root, "shapes", data_dir=data_dir, val_fraction=0.2, workers=2, quiet=True)
    return root, files, data_dir, report


def test_folder_round_trip_every_file_once_with_its_label_and_a_stable_split(shapes, tmp_path):
    _, files, data_dir, report = shapes
    stored = {}
    for split in ("train", "validation"):
        for record in read_split("shapes", data_dir, split):
            path = record["file_name"].decode()
            assert path not in stored, f"{path} stored twice"
            stored[path] = (split, int(record["label"]), bytes(record["image"]))
    assert set(stored) == set(files)
    for path, (label, data) in files.items():
        assert stored[path][1:] == (label, data), path  # the label, and the bytes as they were (no re-encode)
    validation = {path for path, (split, _, _) in stored.items() if split == "validation"}
    assert validation == md5_validation(files, 0.2)
    info = dataset_info("shapes", data_dir)
    assert info.class_names == CLASSES and info.num_classes == 3
    assert (info.num_train, info.num_eval) == (90 - len(validation), len(validation))
    # Non-image files are ignored and counted, not skipped as broken.
    assert report.ignored == {"non-image files": 1, "files outside class folders": 1} and not report.skipped
    # Records are not stored in class order (each process reads a contiguous block of them).
    first_labels = [int(r["label"]) for r in read_split("shapes", data_dir, "train")[:15]]
    assert len(set(first_labels)) == 3
    # The same files, copied elsewhere in another order, give the same split (any machine, any listing order).
    copy = tmp_path / "elsewhere" / "shapes"
    for path in sorted(files, reverse=True):
        os.makedirs(copy / os.path.dirname(path), exist_ok=True)
        (copy / path).write_bytes(files[path][1])
    prepare_folder(str(copy), "copy", data_dir=str(tmp_path / "tfds"), val_fraction=0.2, quiet=True)
    again = {r["file_name"].decode() for r in read_split("copy", str(tmp_path / "tfds"), "validation")}
    assert again == validation
    for split in ("train", "validation"):  # and byte-identical files
        ours = (tmp_path / "tfds" / "copy" / "1.0.0" / f"copy-{split}.array_record-00000-of-00001").read_bytes()
        theirs = Path(data_dir, "shapes", "1.0.0", f"shapes-{split}.array_record-00000-of-00001").read_bytes()
        assert ours == theirs


def test_val_dir_and_the_eval_loader(tmp_path):
    train = make_folder(str(tmp_path / "train"), per_class=4, seed=1)
    val = make_folder(str(tmp_path / "val"), per_class=3, seed=2)
    prepare_folder(
        str(tmp_path / "train"), "two_folders", data_dir=str(tmp_path / "d"), val_dir=str(tmp_path / "val"), quiet=True
    )
    assert {r["file_name"].decode() for r in read_split("two_folders", str(tmp_path / "d"), "train")} == set(train)
    raw = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}
    batches = list(
        create_eval_loader(
            "two_folders", data_dir=str(tmp_path / "d"), batch_size=4, image_size=36, resize_size=36, **raw
        )
    )
    labels = collections.Counter(int(y) for b in batches for y, m in zip(b["label"], b["mask"]) if m)
    assert labels == collections.Counter(label for label, _ in val.values())


@pytest.mark.slow  # about 30 s on 2 CPU cores
def test_short_training_on_a_prepared_folder_beats_chance(shapes, tmp_path):
    from resnext_jax.training import train_and_evaluate
    from resnext_jax.training.config import default_config

    _, _, data_dir, _ = shapes
    config = default_config()
    config.model = "resnext50_32x4d"
    config.model_kwargs.update(stage_sizes=(1, 1), num_filters=16, cardinality=8, bottleneck_width=16, small_stem=True)
    config.update(
        dataset="shapes",
        data_dir=data_dir,
        image_size=32,
        transform="none",
        batch_size=16,
        eval_batch_size=32,
        optimizer="adamw",
        learning_rate=5e-3,
        weight_decay=0.05,
        warmup_epochs=1,
        num_epochs=4,
        log_every_steps=10,
        checkpoint_every_steps=1000,
        progress_bar=False,
    )
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["eval"]["top1"] >= 0.8, summary  # three classes: chance is 1/3


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_archive_round_trips(name, tmp_path):
    archive = str(tmp_path / f"{name}-binary.tar.gz")
    truth = cifar_archive(archive, name, num_train=50, num_test=10)
    prepare_cifar(name, archive, data_dir=str(tmp_path / "d"), quiet=True)
    info = dataset_info(name, str(tmp_path / "d"))
    assert (info.num_train, info.num_eval, info.eval_split) == (50, 10, "test")
    assert info.class_names[:2] == (("class0", "class1") if name == "cifar10" else ("fine0", "fine1"))
    for split in ("train", "test"):
        labels, coarse, pixels = truth[split]
        records = {r["id"].decode(): r for r in read_split(name, str(tmp_path / "d"), split)}
        assert sorted(records) == [f"{split}_{i:05d}" for i in range(len(labels))]
        for index in range(len(labels)):
            record = records[f"{split}_{index:05d}"]
            assert int(record["label"]) == labels[index]
            np.testing.assert_array_equal(decode_image(record["image"]), pixels[index])
            if name == "cifar100":
                assert int(record["coarse_label"]) == coarse[index]


@pytest.mark.parametrize(
    "name,member", [("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train")]
)
def test_cifar_pickled_python_version_is_refused(name, member, tmp_path):
    archive = str(tmp_path / "python.tar.gz")
    write_tar(archive, {member: b"\x80\x04pickle"}, "w:gz")
    with pytest.raises(UserError, match="pickled Python version.*binary version"):
        prepare_cifar(name, archive, data_dir=str(tmp_path / "d"), quiet=True)
    assert not os.path.exists(tmp_path / "d" / name)


def test_imagenette_archive_round_trips(tmp_path):
    from resnext_jax.data.datasets import IMAGENETTE_CLASSES

    synsets = sorted(
        [
            "n01440764",
            "n02102040",
            "n02979186",
            "n03000684",
            "n03028079",
            "n03394916",
            "n03417042",
            "n03425413",
            "n03445777",
            "n03888257",
        ]
    )
    rng = np.random.default_rng(3)
    members, truth = {}, {}
    for split in ("train", "val"):
        for label, synset in enumerate(synsets):
            for index in range(2 if split == "train" else 1):
                name = f"imagenette2-160/{split}/{synset}/{synset}_{index}.JPEG"
                members[name] = encoded(shape_image(label % 3, rng), "JPEG")
                truth[name] = ("train" if split == "train" else "validation", label)
    members["imagenette2-160/noisy_imagenette.csv"] = b"path,noisy_labels_0\n"
    archive = str(tmp_path / "imagenette2-160.tgz")
    write_tar(archive, members, "w:gz")
    report = prepare_imagenette(archive, data_dir=str(tmp_path / "d"), workers=2, quiet=True)  # bytes to workers
    assert report.target.endswith(os.path.join("imagenette", "160px-v2", "1.0.0"))
    info = dataset_info("imagenette/160px-v2", str(tmp_path / "d"))
    assert (info.num_train, info.num_eval, info.class_names) == (20, 10, IMAGENETTE_CLASSES)
    seen = {}
    for split in ("train", "validation"):
        for record in read_split("imagenette/160px-v2", str(tmp_path / "d"), split):
            matches = [name for name, data in members.items() if data == bytes(record["image"])]
            assert len(matches) == 1
            seen[matches[0]] = (split, int(record["label"]))
    assert seen == truth
    assert report.ignored["archive members outside train/ and val/"] == 1


def test_imagenet_tars_round_trip_with_validation_labels_cmyk_and_png_as_jpeg(tmp_path):
    synsets, validation = imagenet_labels()
    assert len(synsets) == 1000 and len(validation) == 50000
    rng = np.random.default_rng(4)
    chosen = [synsets[0], synsets[1], synsets[999]]
    truth = {}
    outer = {}
    for synset in chosen:
        inner = {}
        for index in range(3):
            name = f"{synset}_{index}.JPEG"
            data = cmyk_jpeg(rng) if index == 0 else encoded(shape_image(index, rng), "PNG" if index == 1 else "JPEG")
            inner[name] = data
            truth[name] = ("train", synsets.index(synset), data)
        buffer = io.BytesIO()
        write_tar(buffer, inner, "w")
        outer[f"{synset}.tar"] = buffer.getvalue()
    os.makedirs(tmp_path / "in")
    write_tar(str(tmp_path / "in" / "ILSVRC2012_img_train.tar"), outer, "w")
    val = {}
    for number in (1, 2, 500, 50000):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        val[name] = encoded(shape_image(number % 3, rng), "JPEG")
        truth[name] = ("validation", synsets.index(validation[number - 1]), val[name])
    write_tar(str(tmp_path / "in" / "ILSVRC2012_img_val.tar"), val, "w")
    prepare_imagenet(str(tmp_path / "in"), data_dir=str(tmp_path / "d"), quiet=True)
    info = dataset_info("imagenet2012", str(tmp_path / "d"))
    assert (info.num_train, info.num_eval, len(info.class_names)) == (9, 4, 1000)
    seen = {}
    for split in ("train", "validation"):
        for record in read_split("imagenet2012", str(tmp_path / "d"), split):
            seen[record["file_name"].decode()] = (split, int(record["label"]), bytes(record["image"]))
    assert seen == truth
    # CMYK and a PNG named .JPEG decode as torchvision's ImageFolder (PIL, convert('RGB')) decodes them.
    for name in (f"{chosen[0]}_0.JPEG", f"{chosen[0]}_1.JPEG"):
        expected = np.asarray(Image.open(io.BytesIO(truth[name][2])).convert("RGB"))
        np.testing.assert_array_equal(decode_image(seen[name][2]), expected)


def test_preparing_never_imports_tensorflow(tmp_path):
    make_folder(str(tmp_path / "f"), per_class=2)
    cifar_archive(str(tmp_path / "c.tar.gz"), "cifar10", 5, 5)
    code = (
        "import sys; from resnext_jax.data.prepare.__main__ import main; from resnext_jax.data import "
        "dataset_info, create_train_loader\n"
        f"main(['folder', {str(tmp_path / 'f')!r}, '--name', 'f', '--data-dir', {str(tmp_path / 'd')!r}, "
        "'--workers', '0', '--quiet'])\n"
        f"main(['cifar10', '--from', {str(tmp_path / 'c.tar.gz')!r}, '--data-dir', {str(tmp_path / 'd')!r}, "
        "'--workers', '0', '--quiet'])\n"
        f"next(iter(create_train_loader('f', data_dir={str(tmp_path / 'd')!r}, batch_size=2, image_size=8)))\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\nprint('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    # The same folder prepared here (another process, another string-hash seed) gives byte-identical files.
    prepare_folder(str(tmp_path / "f"), "f", data_dir=str(tmp_path / "here"), quiet=True)
    for split in ("train", "validation"):
        name = f"f/1.0.0/f-{split}.array_record-00000-of-00001"
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
