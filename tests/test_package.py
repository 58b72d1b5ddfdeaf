"""The package as a Flax user installs it: the base install builds, converts and runs models without the training
stack, torch or timm, and the wheel holds the library alone (no top-level `train`), its license and its type hints."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch_reference import randomized_torchvision, torch_logits

import resnext_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the base install must not need: the `train` extra's modules, torch and timm.
NOT_INSTALLED = [
    "optax",
    "orbax",
    "ml_collections",
    "tensorflow_datasets",
    "grain",
    "array_record",
    "cv2",
    "sklearn",
    "tqdm",
    "matplotlib",
    "tensorboardX",
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxruntime",
]

# Runs in a fresh interpreter where importing any of NOT_INSTALLED fails, as on a base install.
BASE_USER = """
import importlib.abc, json, sys
import numpy as np

blocked = set(sys.argv[1].split(","))

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not in the base install)")
        return None

sys.meta_path.insert(0, NotInstalled())

import jax.numpy as jnp
import resnext_jax
from resnext_jax.convert import from_timm, from_torchvision
from resnext_jax.summary import summarize

images = np.load(sys.argv[2])
state = dict(np.load(sys.argv[3]))
tv = resnext_jax.create_model("resnet18")
tv_logits = tv.apply(from_torchvision("resnet18", state), jnp.asarray(images), train=False)
timm_model = resnext_jax.create_model("resnet18d")
timm_logits = timm_model.apply(from_timm("resnet18d", sys.argv[4]), jnp.asarray(images), train=False)
fresh = resnext_jax.create_model("resnet18", num_classes=3)
import jax
variables = fresh.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
print(json.dumps({
    "torchvision": np.asarray(tv_logits).tolist(),
    "timm": np.asarray(timm_logits).tolist(),
    "fresh_shape": list(fresh.apply(variables, jnp.asarray(images[:, :32, :32]), train=False).shape),
    "params": summarize("resnet50", 224)["params"],
    "loaded": loaded,
}))
"""


def test_base_install_builds_converts_and_runs_models_without_the_training_stack(tmp_path):
    images = np.random.default_rng(0).standard_normal((2, 65, 79, 3), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    reference = randomized_torchvision("resnet18", size=64)
    np.savez(tmp_path / "state.npz", **{k: v.numpy() for k, v in reference.state_dict().items()})
    torch.manual_seed(0)
    timm_reference = timm.create_model("resnet18d", pretrained=False).eval()
    save_file(timm_reference.state_dict(), str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        timm_expected = timm_reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BASE_USER,
            ",".join(NOT_INSTALLED),
            str(tmp_path / "images.npy"),
            str(tmp_path / "state.npz"),
            str(tmp_path / "model.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["loaded"] == []
    np.testing.assert_allclose(out["torchvision"], torch_logits(reference, images), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["timm"], timm_expected, rtol=0, atol=1e-4 * max(1.0, np.abs(timm_expected).max()))
    assert out["fresh_shape"] == [2, 3]
    assert out["params"] == 25_557_032  # torchvision's ResNet50_Weights meta


@pytest.mark.slow  # builds the wheel (about 10 s)
def test_wheel_holds_the_library_license_and_type_hints_but_no_train_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [wheel] = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert wheel.startswith(f"resnext_jax-{resnext_jax.__version__}-")
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"resnext_jax"}
    assert "resnext_jax/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    metadata = zipfile.ZipFile(tmp_path / wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [line for line in requires if "extra ==" not in line]
    assert sorted(line.split()[1].split(">")[0].split("<")[0].split("=")[0] for line in base) == [
        "flax",
        "jax",
        "numpy",
        "pillow",
        "safetensors",
    ]
