"""torchvision's train or inference step, the baseline the JAX step is timed against in the same process."""

from __future__ import annotations


def torch_device(jax_platform: str) -> str:
    """torch's device for the baseline: 'cuda' when JAX runs on a GPU and torch sees one, else 'cpu'."""
    import torch

    if jax_platform == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def make_torch_step(
    name: str,
    mode: str,
    batch: int,
    resolution: int,
    dtype: str,
    channels_last: bool,
    optimizer: str,
    num_classes: int = 1000,
    device: str = "cpu",
):
    """Returns a zero-arg callable running one torchvision train (loss, backward, optimizer) or no-grad step.

    On 'cuda' the call waits for the GPU (`torch.cuda.synchronize`), as the JAX step waits for its result;
    `bfloat16` is autocast (PyTorch AMP) on either device, with float32 params, like the JAX model.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=num_classes).to(device)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bfloat16" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        if autocast is None:
            return model(images)
        with autocast():
            return model(images)

    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode():
                forward()
            sync()

        return infer
    model.train()
    opt = (
        torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def train():
        opt.zero_grad(set_to_none=True)
        loss_fn(forward().float(), labels).backward()
        opt.step()
        sync()

    return train
