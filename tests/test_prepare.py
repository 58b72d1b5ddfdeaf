"""`python -m resnext_jax.data.prepare` on data the tests make in the real formats, read back by the loaders.

Every check compares against what the test itself generated: each file comes back exactly once, byte for byte,
with its label; the split is the one an independent md5 rule gives; bad input fails with one line that names the
fix and leaves nothing that loads.
"""
import collections
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from resnext_jax.data import create_eval_loader, dataset_info, datasets
from resnext_jax.data.prepare.archives import prepare_cifar, prepare_imagenette
from resnext_jax.data.prepare.folder import prepare_folder
from resnext_jax.data.prepare.imagenet import imagenet_labels, prepare_imagenet
from resnext_jax.data.transforms import decode_image
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
        paths = sorted((path for path, (lab, _) in files.items() if lab == label),
                       key=lambda path: hashlib.md5(path.encode()).hexdigest())
        expected |= set(paths[:max(1, round(fraction * len(paths)))])
    return expected


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
    prepare_folder(str(tmp_path / "train"), "two_folders", data_dir=str(tmp_path / "d"), val_dir=str(tmp_path / "val"),
                   quiet=True)
    assert {r["file_name"].decode() for r in read_split("two_folders", str(tmp_path / "d"), "train")} == set(train)
    raw = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}
    batches = list(create_eval_loader("two_folders", data_dir=str(tmp_path / "d"), batch_size=4, image_size=36,
                                      resize_size=36, **raw))
    labels = collections.Counter(int(l) for b in batches for l, m in zip(b["label"], b["mask"]) if m)
    assert labels == collections.Counter(label for label, _ in val.values())


@pytest.mark.slow  # about 30 s on 2 CPU cores
def test_short_training_on_a_prepared_folder_beats_chance(shapes, tmp_path):
    from resnext_jax.training import train_and_evaluate
    from resnext_jax.training.config import default_config

    _, _, data_dir, _ = shapes
    config = default_config()
    config.model = "resnext50_32x4d"
    config.model_kwargs.update(stage_sizes=(1, 1), num_filters=16, cardinality=8, bottleneck_width=16,
                               small_stem=True)
    config.update(dataset="shapes", data_dir=data_dir, image_size=32, transform="none", batch_size=16,
                  eval_batch_size=32, optimizer="adamw", learning_rate=5e-3, weight_decay=0.05, warmup_epochs=1,
                  num_epochs=4, log_every_steps=10, checkpoint_every_steps=1000, progress_bar=False)
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["eval"]["top1"] >= 0.8, summary  # three classes: chance is 1/3


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
                members[f"{folder}/data_batch_{batch + 1}.bin"] = records[batch * size:(batch + 1) * size]
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


def test_cifar_pickled_python_version_is_refused(tmp_path):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    write_tar(archive, {"cifar-10-batches-py/data_batch_1": b"\x80\x04pickle"}, "w:gz")
    with pytest.raises(UserError, match="pickled Python version.*binary version"):
        prepare_cifar("cifar10", archive, data_dir=str(tmp_path / "d"), quiet=True)
    assert not os.path.exists(tmp_path / "d" / "cifar10")


def test_imagenette_archive_round_trips(tmp_path):
    from resnext_jax.data.datasets import IMAGENETTE_CLASSES

    synsets = sorted(["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042",
                      "n03425413", "n03445777", "n03888257"])
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
    report = prepare_imagenette(archive, data_dir=str(tmp_path / "d"), quiet=True)
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


def cmyk_jpeg(rng) -> bytes:
    return encoded(shape_image(0, rng).convert("CMYK"), "JPEG")


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
    code = ("import sys; from resnext_jax.data.prepare.__main__ import main; from resnext_jax.data import "
            "dataset_info, create_train_loader\n"
            f"main(['folder', {str(tmp_path / 'f')!r}, '--name', 'f', '--data-dir', {str(tmp_path / 'd')!r}, "
            "'--workers', '0', '--quiet'])\n"
            f"main(['cifar10', '--from', {str(tmp_path / 'c.tar.gz')!r}, '--data-dir', {str(tmp_path / 'd')!r}, "
            "'--workers', '0', '--quiet'])\n"
            f"next(iter(create_train_loader('f', data_dir={str(tmp_path / 'd')!r}, batch_size=2, image_size=8)))\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    # The same folder prepared here (another process, another string-hash seed) gives byte-identical files.
    prepare_folder(str(tmp_path / "f"), "f", data_dir=str(tmp_path / "here"), quiet=True)
    for split in ("train", "validation"):
        name = f"f/1.0.0/f-{split}.array_record-00000-of-00001"
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()


# Bad input: each case fails with one line that names the fix, or is skipped and listed, and nothing half-written
# ever loads.


def assert_nothing_loads(name, data_dir):
    with pytest.raises(UserError):
        dataset_info(name, str(data_dir))
    leftovers = [path for path, _, _ in os.walk(data_dir) if ".incomplete-" in path]
    assert not leftovers, leftovers


def test_empty_folder_one_class_and_empty_class_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders.*<class>/<image>"):
        prepare_folder(str(tmp_path / "empty"), "x", data_dir=str(tmp_path / "d"), quiet=True)
    make_folder(str(tmp_path / "one"), per_class=2)
    for name in CLASSES[1:]:
        for file in os.listdir(tmp_path / "one" / name):
            os.remove(tmp_path / "one" / name / file)
        os.rmdir(tmp_path / "one" / name)
    with pytest.raises(UserError, match="only one class folder .'circle'.*at least two"):
        prepare_folder(str(tmp_path / "one"), "x", data_dir=str(tmp_path / "d"), quiet=True)
    make_folder(str(tmp_path / "hole"), per_class=2)
    (tmp_path / "hole" / "zebra").mkdir()
    (tmp_path / "hole" / "zebra" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="class folder .*zebra has no images.*remove the folder"):
        prepare_folder(str(tmp_path / "hole"), "x", data_dir=str(tmp_path / "d"), quiet=True)
    with pytest.raises(UserError, match="not a directory"):
        prepare_folder(str(tmp_path / "missing"), "x", data_dir=str(tmp_path / "d"), quiet=True)
    assert_nothing_loads("x", tmp_path / "d")


def test_truncated_zero_byte_unreadable_and_looping_files_are_skipped_and_listed(tmp_path, monkeypatch):
    root = tmp_path / "f"
    files = make_folder(str(root), per_class=6)
    (root / "square" / "truncated.jpg").write_bytes(files["square/001.jpg"][1][:200])
    (root / "square" / "zero.png").write_bytes(b"")
    (root / "circle" / "text.jpg").write_bytes(b"hello, not a jpeg")
    (root / "triangle" / "unreadable.png").write_bytes(files["triangle/000.png"][1])
    os.symlink(root / "triangle", root / "triangle" / "loop")  # a directory that contains itself
    os.symlink(root / "gone.png", root / "circle" / "dangling.png")
    unreadable = str(root / "triangle" / "unreadable.png")
    if os.geteuid() == 0:  # root reads a chmod 000 file; make open() fail as it would for a user
        real_open = open

        def deny(path, *args, **kwargs):
            if path == unreadable:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", deny)
    else:
        os.chmod(unreadable, 0)
    report = prepare_folder(str(root), "bad", data_dir=str(tmp_path / "d"), quiet=True)
    monkeypatch.undo()
    skipped = dict(report.skipped)
    assert skipped[str(root / "square" / "truncated.jpg")].startswith("cannot be decoded")
    assert skipped[str(root / "square" / "zero.png")] == "empty file (0 bytes)"
    assert skipped[str(root / "circle" / "text.jpg")] == "not an image PIL can read"
    assert skipped[unreadable].startswith("unreadable (Permission denied")
    assert skipped[str(root / "circle" / "dangling.png")] == "broken symbolic link"
    assert skipped[str(root / "triangle" / "loop")].startswith("symlink loop")
    assert len(report.skipped) == 6
    stored = {r["file_name"].decode() for split in ("train", "validation")
              for r in read_split("bad", str(tmp_path / "d"), split)}
    assert stored == set(files)  # every good file once, nothing through the loop twice
    summary = report.summary(report.target)
    assert "skipped 6 unusable file(s)" in summary and "truncated.jpg: cannot be decoded" in summary


def test_a_class_whose_images_are_all_broken_is_refused(tmp_path):
    root = tmp_path / "f"
    make_folder(str(root), per_class=2)
    for file in os.listdir(root / "square"):
        (root / "square" / file).write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(UserError, match=r"no usable training image in class folder\(s\) \['square'\]"):
        prepare_folder(str(root), "x", data_dir=str(tmp_path / "d"), quiet=True)
    assert_nothing_loads("x", tmp_path / "d")


def test_existing_dataset_is_refused_unless_overwrite(tmp_path):
    make_folder(str(tmp_path / "a"), per_class=2, seed=0)
    make_folder(str(tmp_path / "b"), per_class=3, seed=1)
    prepare_folder(str(tmp_path / "a"), "same", data_dir=str(tmp_path / "d"), val_fraction=0.34, quiet=True)
    with pytest.raises(UserError, match="already holds a prepared same; pass --overwrite"):
        prepare_folder(str(tmp_path / "b"), "same", data_dir=str(tmp_path / "d"), val_fraction=0.34, quiet=True)
    assert dataset_info("same", str(tmp_path / "d")).num_train == 3  # untouched
    prepare_folder(str(tmp_path / "b"), "same", data_dir=str(tmp_path / "d"), val_fraction=0.34, overwrite=True,
                   quiet=True)
    assert dataset_info("same", str(tmp_path / "d")).num_train == 6
    assert sorted(os.listdir(tmp_path / "d" / "same")) == ["1.0.0"]
    with pytest.raises(UserError, match="built-in dataset"):
        prepare_folder(str(tmp_path / "a"), "cifar10", data_dir=str(tmp_path / "d"), quiet=True)
    with pytest.raises(UserError, match="not a valid dataset name"):
        prepare_folder(str(tmp_path / "a"), "My Photos", data_dir=str(tmp_path / "d"), quiet=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (needs root and mount permission; the test is skipped, with the reason, without them)."""
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=False,
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'}); the full-disk "
                    f"path needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_removes_the_partial_output_and_says_so(tmp_path, small_tmpfs):
    root = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(12):  # 12 x 3 incompressible 100 KB PNGs: 3.6 MB for a 3 MiB disk
            pixels = rng.integers(0, 256, (190, 180, 3), dtype=np.uint8)
            (root / name / f"{index}.png").write_bytes(encoded(Image.fromarray(pixels), "PNG"))
    with pytest.raises(UserError, match=r"is full \(.* MiB free\).*partial shapes? was removed|is full.*removed"):
        prepare_folder(str(root), "noise", data_dir=str(small_tmpfs), quiet=True)
    assert os.listdir(small_tmpfs) == []  # not even an empty noise/ folder
    assert_nothing_loads("noise", small_tmpfs)


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_run_leaves_nothing_that_loads(tmp_path, workers):
    make_folder(str(tmp_path / "f"), per_class=40)
    data_dir = tmp_path / "d"
    # Each image takes 50 ms to check (6 s in all), so the run is surely mid-write when Ctrl-C arrives.
    code = ("import sys, time; from resnext_jax.data.prepare import images, __main__ as cli; real = images.load_item\n"
            "images.load_item = lambda source: (time.sleep(0.05), real(source))[1]\n"
            "from resnext_jax.errors import run_cli\n"
            f"sys.exit(run_cli(cli.main, ['folder', {str(tmp_path / 'f')!r}, '--name', 'f', '--data-dir', "
            f"{str(data_dir)!r}, '--workers', '{workers}', '--quiet']))")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".incomplete-" in p for p, _, _ in os.walk(data_dir)):
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert_nothing_loads("f", data_dir)


def test_cli_help_and_errors_are_one_line(tmp_path):
    run = [sys.executable, "-m", "resnext_jax.data.prepare"]
    helped = subprocess.run(run + ["folder", "--help"], check=False, capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0 and "--val-fraction" in helped.stdout and "--overwrite" in helped.stdout
    failed = subprocess.run(run + ["folder", str(tmp_path / "nope"), "--name", "x", "--data-dir", str(tmp_path)],
                            check=False, capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"error: DIR {tmp_path / 'nope'} is not a directory; pass a folder laid out as DIR/<class>/<image>.jpg"]


def test_corrupt_array_record_file_names_the_file_and_the_fix(shapes, tmp_path):
    import shutil

    _, _, data_dir, _ = shapes
    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    shard = next(p for p in (copy / "shapes" / "1.0.0").iterdir() if "-train.array_record" in p.name)
    data = bytearray(shard.read_bytes())
    for offset in range(200, len(data) - 200, 997):  # flip bytes all through the file
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as caught:
        source = datasets.open_source("shapes", "train", str(copy))
        for index in range(len(source)):
            source[index]
    message = str(caught.value)
    assert str(shard) in message and "damaged" in message
    assert "python -m resnext_jax.data.prepare folder" in message and "--overwrite" in message
    shard.write_bytes(bytes(data[:len(data) // 2]))  # truncated: fails when the source opens
    with pytest.raises(UserError, match="damaged"):
        datasets.open_source("shapes", "train", str(copy))


def test_read_only_data_dir_for_digits_names_the_fix(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], check=False,
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        with pytest.raises(UserError, match=r"is not writable \(Read-only file system\).*use a writable directory"):
            dataset_info("digits", str(mount))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_first_digits_build_prints_one_line(tmp_path):
    code = f"from resnext_jax.data import dataset_info; dataset_info('digits', {str(tmp_path)!r})"
    run = [sys.executable, "-c", code]
    result = subprocess.run(run, check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Building the digits dataset once (offline, from scikit-learn) in {tmp_path}"]
    again = subprocess.run(run, check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.stderr.strip() == ""


def test_cut_off_or_wrong_archives_are_refused(tmp_path):
    cifar_archive(str(tmp_path / "c.tar.gz"), "cifar10", 20, 5)
    data = (tmp_path / "c.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="ends early or is damaged.*download it again"):
        prepare_cifar("cifar10", str(tmp_path / "cut.tar.gz"), data_dir=str(tmp_path / "d"), quiet=True)
    with pytest.raises(UserError, match="lacks.*not cifar100's binary archive.*cifar-100-binary.tar.gz"):
        prepare_cifar("cifar100", str(tmp_path / "c.tar.gz"), data_dir=str(tmp_path / "d"), quiet=True)
    with pytest.raises(UserError, match="holds cifar-10-batches-bin/, not imagenette2"):
        prepare_imagenette(str(tmp_path / "c.tar.gz"), data_dir=str(tmp_path / "d"), quiet=True)
    with pytest.raises(UserError, match="lacks ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar; download them"):
        prepare_imagenet(str(tmp_path), data_dir=str(tmp_path / "d"), quiet=True)
    assert not os.path.exists(tmp_path / "d" / "cifar10") and not os.path.exists(tmp_path / "d" / "cifar100")


def test_a_killed_run_s_temporary_directory_is_removed_by_the_next_run(tmp_path):
    make_folder(str(tmp_path / "f"), per_class=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "d" / "f" / f".incomplete-1.0.0-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / "f-train.array_record-00000-of-00001").write_bytes(b"half")
    assert_raises_unknown = pytest.raises(UserError, match="Unknown dataset 'f'")
    with assert_raises_unknown:  # a killed run's leftovers never load
        dataset_info("f", str(tmp_path / "d"))
    prepare_folder(str(tmp_path / "f"), "f", data_dir=str(tmp_path / "d"), val_fraction=0.5, quiet=True)
    assert sorted(os.listdir(tmp_path / "d" / "f")) == ["1.0.0"]
