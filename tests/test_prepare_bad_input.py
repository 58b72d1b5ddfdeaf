"""Bad input to `python -m resnext_jax.data.prepare` and damaged datasets: each case is one line that names the
fix, or a listed skip, and nothing half-written ever loads."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from prepared_data import (
    CLASSES,
    REPO,
    assert_nothing_loads,
    cifar_archive,
    encoded,
    make_folder,
    read_split,
)

from resnext_jax.data import dataset_info, datasets
from resnext_jax.data.prepare.archives import prepare_cifar, prepare_imagenette
from resnext_jax.data.prepare.folder import prepare_folder
from resnext_jax.data.prepare.imagenet import prepare_imagenet
from resnext_jax.errors import UserError


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
    stored = {
        r["file_name"].decode()
        for split in ("train", "validation")
        for r in read_split("bad", str(tmp_path / "d"), split)
    }
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
    prepare_folder(
        str(tmp_path / "b"), "same", data_dir=str(tmp_path / "d"), val_fraction=0.34, overwrite=True, quiet=True
    )
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
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=False, capture_output=True, text=True
    )
    if result.returncode:
        pytest.skip(
            f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'}); the full-disk path needs one"
        )
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_removes_the_partial_output_and_says_so(tmp_path, small_tmpfs):
    root = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for name in CLASSES:
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
    code = (
        "import sys, time; from resnext_jax.data.prepare import images, __main__ as cli; real = images.load_item\n"
        "images.load_item = lambda source: (time.sleep(0.05), real(source))[1]\n"
        "from resnext_jax.errors import run_cli\n"
        f"sys.exit(run_cli(cli.main, ['folder', {str(tmp_path / 'f')!r}, '--name', 'f', '--data-dir', "
        f"{str(data_dir)!r}, '--workers', '{workers}', '--quiet']))"
    )
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
    failed = subprocess.run(
        run + ["folder", str(tmp_path / "nope"), "--name", "x", "--data-dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"error: DIR {tmp_path / 'nope'} is not a directory; pass a folder laid out as DIR/<class>/<image>.jpg"
    ]


def test_corrupt_array_record_file_names_the_file_and_the_fix(tmp_path):
    make_folder(str(tmp_path / "shapes"), per_class=10)
    copy = tmp_path / "d"
    prepare_folder(str(tmp_path / "shapes"), "shapes", data_dir=str(copy), quiet=True)
    shard = next(p for p in (copy / "shapes" / "1.0.0").iterdir() if "-train.array_record" in p.name)
    data = bytearray(shard.read_bytes())
    for offset in range(200, len(data) - 200, 97):  # flip bytes all through the file (padding included)
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as caught:
        source = datasets.open_source("shapes", "train", str(copy))
        for index in range(len(source)):
            source[index]
    message = str(caught.value)
    assert str(shard) in message and "damaged" in message
    assert "python -m resnext_jax.data.prepare folder" in message and "--overwrite" in message
    shard.write_bytes(bytes(data[: len(data) // 4]))  # cut short: fails when the source opens
    with pytest.raises(UserError, match="damaged"):
        datasets.open_source("shapes", "train", str(copy))


def test_read_only_data_dir_for_digits_names_the_fix(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], check=False, capture_output=True, text=True
    )
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
        f"Building the digits dataset once (offline, from scikit-learn) in {tmp_path}"
    ]
    again = subprocess.run(run, check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.stderr.strip() == ""


def test_cut_off_or_wrong_archives_are_refused(tmp_path):
    cifar_archive(str(tmp_path / "c.tar.gz"), "cifar10", 20, 5)
    data = (tmp_path / "c.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
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


# Issue 29: one decoder for train, eval, prepare and predict; prepare walks each file once and is race-free.


def _every_mode(gray: np.ndarray, rgb: np.ndarray) -> dict[str, tuple[bytes, np.ndarray]]:
    """{mode: (encoded file, the RGB uint8 pixels it must decode to)}, each built from 8-bit `gray` or `rgb`."""

    def saved(image, format):
        return encoded(image, format)

    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    palette = Image.fromarray(rgb).quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    cmyk = Image.fromarray(rgb).convert("CMYK")
    return {
        "1": (saved(Image.fromarray(gray > 127), "PNG"), np.where(gray3 > 127, 255, 0).astype(np.uint8)),
        "L": (saved(Image.fromarray(gray), "PNG"), gray3),
        "LA": (saved(Image.fromarray(np.stack([gray, 255 - gray], -1), "LA"), "PNG"), gray3),
        "RGB": (saved(Image.fromarray(rgb), "PNG"), rgb),
        "RGBA": (saved(Image.fromarray(np.concatenate([rgb, gray[..., None]], -1)), "PNG"), rgb),
        "P": (saved(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "P+transparency": (saved(transparent, "PNG"), np.asarray(palette.convert("RGB"))),
        "CMYK": (saved(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB"))),
        "I;16": (saved(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), gray3),
        "I": (saved(Image.fromarray(gray.astype(np.int32) * 257), "TIFF"), gray3),
        "F": (saved(Image.fromarray(gray.astype(np.float32) / 255), "TIFF"), gray3),
    }


def test_every_pil_mode_decodes_to_the_same_pixels_in_train_eval_prepare_and_predict(tmp_path):
    """A 16-bit PNG was all white in training (PIL's convert clips at 255) and scaled in predict; a 0..1 float
    TIFF was black. Every mode now goes through transforms.to_rgb: the train loader's "none" transform (at the
    image's own size, so no resize), the eval loader's decode, prepare's statistics and predict's read_image."""
    from resnext_jax.data import loaders
    from resnext_jax.data import transforms as T
    from resnext_jax.data.prepare.images import channel_stats, inspect_image
    from resnext_jax.inference.images import read_image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    train = loaders._TrainTransform("none", 24, None)
    for mode, (data, expected) in _every_mode(gray, rgb).items():
        assert Image.open(__import__("io").BytesIO(data)).mode == mode.split("+")[0], mode
        path = tmp_path / f"{mode}.img"
        path.write_bytes(data)
        predicted, notes = read_image(str(path))
        decoded = {
            "train": train._augment(data, np.random.default_rng(0)),
            "eval": np.asarray(T.decode_image(data)),
            "predict": np.asarray(predicted),
        }
        for where, pixels in decoded.items():
            np.testing.assert_array_equal(pixels, expected, err_msg=f"{mode} in {where}")
        problem, stats = inspect_image(data)
        assert problem is None
        np.testing.assert_allclose(stats, channel_stats(expected), err_msg=mode)
        assert bool(notes) == (mode in ("I;16", "I", "F")), (mode, notes)


def test_a_folder_of_16_bit_pngs_records_the_statistics_of_the_pixels_the_loader_sees(tmp_path):
    """Its recorded mean was 0.9966 (every pixel clipped to white) while predict scaled the files."""
    rng = np.random.default_rng(1)
    for label, name in enumerate(CLASSES):
        os.makedirs(tmp_path / "f" / name)
        for index in range(4):
            gray = rng.integers(40 * label, 40 * label + 60, (20, 20), dtype=np.uint16)
            Image.fromarray(gray * 257).save(tmp_path / "f" / name / f"{index}.png")
    report = prepare_folder(
        str(tmp_path / "f"), "wide", data_dir=str(tmp_path / "d"), val_fraction=0.25, workers=2, quiet=True
    )
    assert "note: 12 image(s): 16-bit grayscale, scaled to 8 bits, as training and predict decode them" in (
        report.summary(report.target)
    )
    info = dataset_info("wide", str(tmp_path / "d"))
    from resnext_jax.data import transforms as T

    pixels = np.stack(
        [np.asarray(T.decode_image(r["image"])) for r in read_split("wide", str(tmp_path / "d"), "train")]
    )
    assert pixels.max() < 200  # scaled, not clipped to white
    np.testing.assert_allclose(info.mean, pixels[:, ::4, ::4].reshape(-1, 3).mean(0) / 255, atol=2e-4)


def test_links_into_other_classes_or_back_to_the_root_never_relabel_an_image(tmp_path):
    """`circle/loop -> ..` walked into the other classes and labelled their images circle; a link into another
    class's folder did the same. Each directory and file is now read once, by real path, and the skips listed."""
    root = tmp_path / "f"
    files = make_folder(str(root), per_class=6)
    os.symlink("..", root / "circle" / "loop")
    os.symlink(os.path.join("..", "triangle"), root / "square" / "theirs")
    os.symlink("000.png", root / "triangle" / "again.png")
    report = prepare_folder(str(root), "linked", data_dir=str(tmp_path / "d"), quiet=True)
    stored = [
        (r["file_name"].decode(), int(r["label"]))
        for split in ("train", "validation")
        for r in read_split("linked", str(tmp_path / "d"), split)
    ]
    assert sorted(stored) == sorted((path, label) for path, (label, _) in files.items())  # each once, own label
    skipped = dict(report.skipped)
    assert skipped[str(root / "circle" / "loop")].startswith("a link to the folder being prepared")
    assert skipped[str(root / "square" / "theirs")].startswith("a link into class 'triangle'")
    assert skipped[str(root / "triangle" / "again.png")] == "the same file as triangle/000.png (read once)"


def test_two_prepares_of_one_name_never_silently_replace_each_other(tmp_path, monkeypatch):
    """Two prepares of the same name started together both printed "wrote"; the later silently replaced the
    other's dataset. A lock per name refuses the second; a writer the lock cannot see (another machine) makes
    the final rename refuse, keeping the other's dataset."""
    from resnext_jax.data.prepare import folder, writer

    make_folder(str(tmp_path / "a"), per_class=2, seed=0)
    make_folder(str(tmp_path / "b"), per_class=3, seed=1)
    data_dir = str(tmp_path / "d")
    os.makedirs(data_dir)
    held = writer._take_lock(data_dir, "same")
    with pytest.raises(UserError, match=r"another prepare of same is running .*pid \d+.*wait for it to finish"):
        prepare_folder(str(tmp_path / "b"), "same", data_dir=data_dir, quiet=True)
    writer._release_lock(held)
    assert_nothing_loads("same", tmp_path / "d")

    elsewhere = str(tmp_path / "elsewhere")
    prepare_folder(str(tmp_path / "a"), "same", data_dir=elsewhere, val_fraction=0.5, quiet=True)
    real_write_items = folder.write_items

    def meanwhile_another_machine_writes(*args, **kwargs):  # its rename lands while this run writes
        shutil.copytree(os.path.join(elsewhere, "same", "1.0.0"), os.path.join(data_dir, "same", "1.0.0"))
        return real_write_items(*args, **kwargs)

    monkeypatch.setattr(folder, "write_items", meanwhile_another_machine_writes)
    with pytest.raises(UserError, match="was written by another prepare while this one ran; it is kept"):
        prepare_folder(str(tmp_path / "b"), "same", data_dir=data_dir, val_fraction=0.34, quiet=True)
    assert dataset_info("same", data_dir).num_train == 3  # the other's (2 per class, half for validation)
    assert sorted(os.listdir(tmp_path / "d" / "same")) == ["1.0.0"]  # nothing half-written left
