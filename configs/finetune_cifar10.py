"""Fine-tune torchvision's ResNeXt-50 32x4d (IMAGENET1K_V2) on CIFAR-10 at 224x224: converted weights, a new
10-class head, the backbone at a tenth of the head's learning rate, ImageNet normalization.

    python -m train --config configs/finetune_cifar10.py                       # torchvision weight tag
    python -m train --config configs/finetune_cifar10.py --config.init_from=/path/resnext50.pth
    python -m train --config configs/finetune_cifar10.py --config.freeze_bn=True   # small batches

The weight tag needs the torch extra (`pip install -e '.[torch]'`) and network access once (torch hub cache).
"""

from resnext_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model = "resnext50_32x4d"
    config.init_from = "IMAGENET1K_V2"
    config.reinit_head = True
    config.freeze_bn = False
    config.backbone_lr_mult = 0.1
    config.dataset = "cifar10"
    config.normalize = "model"
    config.image_size = 224
    config.transform = "resize_crop"
    config.half_precision = True
    config.batch_size = 64
    config.eval_batch_size = 250
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.grad_clip_norm = 0.0
    config.label_smoothing = 0.1
    config.warmup_epochs = 0.5
    config.num_epochs = 5
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.worker_count = 4
    return config
