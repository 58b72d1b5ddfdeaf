"""torchvision models with every tensor randomized, as references for the Flax models.

Random init alone leaves BatchNorm at scale 1, bias 0, mean 0 and var 1, behind which
a wrong transpose of a per-channel vector would hide; here every one of them differs.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import torch
import torchvision


def randomized_torchvision(name: str, seed: int = 0, size: int = 224) -> torch.nn.Module:
    """Builds torchvision's `name` with random weights and random, realistic BN statistics (eval mode).

    The statistics are calibrated on random `size` x `size` images (a small size keeps the large builders cheap).
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Calibrate running statistics on a random batch (cumulative average) so that deep
    # random networks keep O(1) activations in eval mode, then perturb everything.
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(max(2, 2 * 224**2 // size**2), 3, size, size))  # as many pixels as 2 at 224
        for norm in norms:
            norm.weight.uniform_(0.8, 1.2)
            norm.bias.normal_(0.0, 0.2)
            norm.running_mean.add_(torch.randn_like(norm.running_mean) * 0.1 * norm.running_var.sqrt())
            norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.8, 1.25))
            # Channels that were dead on the calibration batch would otherwise divide by sqrt(eps).
            norm.running_var.clamp_(min=0.01)
            norm.num_batches_tracked.zero_()
            norm.momentum = 0.1
        # A trained classifier's logits are O(10); random heads on a grown residual stream give
        # O(100), where float32 summation-order noise alone exceeds an absolute 1e-4.
        model.eval()
        head = model.fc
        scale = 2.0 / model(torch.randn(1, 3, size, size)).std()
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return model


def torch_logits(model: torch.nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    """Runs the torch model on NHWC numpy images (converted to NCHW)."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).float().numpy()


def torchvision_skeleton(name: str) -> torch.nn.Module:
    """torchvision's `name` with uninitialized tensors: for shapes and counts, without seconds of init."""
    noop = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    inits = [
        "kaiming_normal_",
        "kaiming_uniform_",
        "normal_",
        "uniform_",
        "zeros_",
        "ones_",
        "constant_",
        "trunc_normal_",
        "xavier_uniform_",
    ]
    with contextlib.ExitStack() as stack:
        for fn in inits:
            stack.enter_context(mock.patch.object(torch.nn.init, fn, noop))
        return getattr(torchvision.models, name)()
