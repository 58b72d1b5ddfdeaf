"""`load_model` and `python -m resnext_jax.predict`: torchvision parity on real photos, bad files, loader errors.

The parity reference is torchvision itself: its model (random weights, randomized BatchNorm statistics) run on
its own eval preset (`ResNet18_Weights.IMAGENET1K_V1.transforms()`), on scikit-learn's two JPEGs.
"""

import json
import os
import struct
import zlib

import numpy as np
import pytest
import sklearn.datasets
import torch
import torchvision
from PIL import Image
from torch_reference import randomized_torchvision

import resnext_jax
from resnext_jax.errors import UserError, run_cli
from resnext_jax.inference import imagenet_class_names
from resnext_jax.predict import main as predict_main

PHOTOS = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
CHINA, FLOWER = os.path.join(PHOTOS, "china.jpg"), os.path.join(PHOTOS, "flower.jpg")


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """(torch model, .pth path) of a randomized resnet18 whose top-5 on both photos is well separated."""
    model = randomized_torchvision("resnet18", seed=0)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def torchvision_probabilities(model, path):
    preset = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        logits = model(preset(Image.open(path).convert("RGB"))[None])
    return torch.softmax(logits.double(), -1)[0].numpy()


def run_predict(capsys, argv):
    code = run_cli(predict_main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def by_path(stdout):
    return {record["path"]: record["top_k"] for record in map(json.loads, stdout.splitlines())}


def test_imagenet_class_names_ship_with_the_package():
    names = imagenet_class_names()
    assert names == tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def test_predict_matches_torchvision_preset_and_model(resnet18, capsys):
    torch_model, weights = resnet18
    code, out, err = run_predict(capsys, [weights, CHINA, FLOWER, "--model", "resnet18", "--json", "--top-k", "5"])
    assert code == 0, err
    results = by_path(out)
    names = imagenet_class_names()
    for path in (CHINA, FLOWER):
        expected = torchvision_probabilities(torch_model, path)
        order = np.argsort(-expected)
        # The reference's top-6 must be separated by more than the tolerance, or the index check means nothing.
        assert np.min(-np.diff(expected[order[:6]])) > 2e-4, expected[order[:6]]
        got = results[path]
        assert [r["class"] for r in got] == order[:5].tolist()
        assert [r["name"] for r in got] == [names[i] for i in order[:5]]
        np.testing.assert_allclose([r["probability"] for r in got], expected[order[:5]], rtol=0, atol=1e-4)
        # and relative to the probabilities' own size (they are ~1e-2 for a random model)
        np.testing.assert_allclose([r["probability"] for r in got], expected[order[:5]], rtol=2e-4)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png(path, side=20000):
    """A valid 1-bit side x side PNG (about 50 kB compressed): decoding it would take side^2 bytes."""
    row = b"\x00" + bytes(side // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    )


def test_bad_files_each_get_one_error_line_and_good_files_still_predict(resnet18, tmp_path, capsys):
    _, weights = resnet18
    china = Image.open(CHINA)
    gray8 = np.asarray(china.convert("L"))
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # 16-bit: 0..65535
    palette = china.quantize(64)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    palette.convert("RGB").save(tmp_path / "palette_as_rgb.png")
    (tmp_path / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    with open(CHINA, "rb") as f:
        data = f.read()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    write_huge_png(tmp_path / "huge.png")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    bad = {
        "notes.jpg": "not an image",
        "truncated.jpg": "truncated",
        "empty.png": "empty (0 bytes)",
        "huge.png": "20000x20000 is 400 megapixels, above the 100 MP limit",
        "dangling.jpg": "cannot read",
        "missing.jpg": "cannot read",
    }
    good = ["gray8.png", "gray16.png", "palette.png", "palette_as_rgb.png"]
    paths = [str(tmp_path / name) for name in [*good[:2], *bad, *good[2:]]] + [CHINA]

    code, out, err = run_predict(capsys, [weights, *paths, "--model", "resnet18", "--json", "--batch", "3"])
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(bad), err
    for name, message in bad.items():
        [line] = [line for line in error_lines if line.startswith(f"error: {tmp_path / name}: ")]
        assert message in line, line
    results = by_path(out)
    assert set(results) == {str(tmp_path / name) for name in good} | {CHINA}
    # 16-bit gray equals its 8-bit original (PIL's plain RGB conversion would make it all white), and a palette
    # PNG with transparency equals its RGB rendering.
    assert results[str(tmp_path / "gray16.png")] == results[str(tmp_path / "gray8.png")]
    assert results[str(tmp_path / "palette.png")] == results[str(tmp_path / "palette_as_rgb.png")]
    assert f"note: {tmp_path / 'gray16.png'}: 16-bit" in err
    # A good file's prediction does not depend on the bad files batched around it.
    _, alone, _ = run_predict(capsys, [weights, CHINA, "--model", "resnet18", "--json"])
    np.testing.assert_allclose(
        [r["probability"] for r in results[CHINA]], [r["probability"] for r in by_path(alone)[CHINA]], atol=1e-6
    )


def test_folders_and_globs_expand_recursively(tmp_path):
    from resnext_jax.inference.images import find_images

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.PNG", "a/b/readme.txt", "z.jpg"):
        (tmp_path / name).write_bytes(b"")
    paths, problems = find_images([str(tmp_path / "a"), str(tmp_path / "*.jpg"), str(tmp_path / "none*.png")])
    assert paths == [str(tmp_path / "a" / "b" / "y.PNG"), str(tmp_path / "a" / "x.jpg"), str(tmp_path / "z.jpg")]
    assert problems == [(str(tmp_path / "none*.png"), "the pattern matches no files")]


def test_loader_errors_name_the_fix(resnet18, tmp_path, capsys):
    _, weights = resnet18
    with pytest.raises(UserError, match="pass the model it belongs to, e.g. --model"):
        resnext_jax.load_model(weights)
    with pytest.raises(UserError, match="does not exist"):
        resnext_jax.load_model(str(tmp_path / "nope.pth"), model="resnet18")
    with pytest.raises(UserError, match="unknown model 'resnet19'.*resnet18"):
        resnext_jax.load_model(weights, model="resnet19")
    with pytest.raises(UserError, match="does not fit resnet50"):
        resnext_jax.load_model(weights, model="resnet50")
    empty = tmp_path / "empty_workdir"
    empty.mkdir()
    with pytest.raises(UserError, match="without config.json"):
        resnext_jax.load_model(str(empty))
    (empty / "config.json").write_text(json.dumps({"model": "resnext51_32x4d", "dataset": "digits"}))
    with pytest.raises(UserError, match="unknown model 'resnext51_32x4d'.*resnext50_32x4d"):
        resnext_jax.load_model(str(empty))
    (empty / "config.json").write_text(json.dumps({"model": "resnet18", "dataset": "digits"}))
    with pytest.raises(UserError, match="has no complete checkpoint; train it first"):
        resnext_jax.load_model(str(empty))
    (empty / "checkpoints" / "12" / "state").mkdir(parents=True)  # a save cut off before its commit marker
    with pytest.raises(UserError, match=r"steps \[12\] are incomplete"):
        resnext_jax.load_model(str(empty))
    with pytest.raises(UserError, match="step 12 .* is incomplete"):
        resnext_jax.load_model(str(empty), which=12)
    # The command line prints each as one line and exits 2.
    code, _, err = run_predict(capsys, [weights, CHINA])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--model" in err
