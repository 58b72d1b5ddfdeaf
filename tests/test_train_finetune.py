"""Fine-tuning end to end: torchvision weights from a .pth through the converter into the training loop."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torchvision
from flax import traverse_util

from resnext_jax.convert import from_torchvision
from resnext_jax.training import default_config, read_metrics, train_and_evaluate


@pytest.mark.slow
def test_finetune_from_pth_with_frozen_backbone_trains_only_the_new_head(tmp_path):
    """backbone_lr_mult=0 and freeze_bn: the backbone must come out bit-identical to the .pth, the head must move.

    Also runs the loop with bf16 compute, Mixup/CutMix and label smoothing switched on.
    """
    torch.manual_seed(0)
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)

    config = default_config()
    config.model = "resnet18"
    config.init_from = path
    config.reinit_head = True
    config.freeze_bn = True
    config.backbone_lr_mult = 0.0
    config.half_precision = True
    config.mixup_alpha, config.cutmix_alpha, config.label_smoothing = 0.2, 1.0, 0.1
    config.dataset = "digits"
    config.image_size = 32
    config.transform = "none"
    config.batch_size = 32
    config.eval_batch_size = 128
    config.optimizer = "adamw"
    config.learning_rate = 1e-2
    config.warmup_epochs = 0
    config.num_epochs = 0.25
    config.log_every_steps = 5
    config.progress_bar = False
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)

    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(steps[-1]), "state"))
    expected = from_torchvision("resnet18", path, num_classes=10, reinit_head=True)
    trained = traverse_util.flatten_dict({"params": state["params"], "batch_stats": state["batch_stats"]})
    reference = traverse_util.flatten_dict(expected)
    assert trained.keys() == reference.keys()
    for key, value in reference.items():
        if key[1] == "fc":
            assert not np.allclose(trained[key], value), f"head {key} did not train"
        else:
            np.testing.assert_array_equal(trained[key], value, err_msg="/".join(key))
    losses = [r["loss"] for r in read_metrics(workdir) if r["split"] == "train"]
    assert all(np.isfinite(losses))
    assert any(r["split"] == "eval" for r in read_metrics(workdir))
