"""ResNeXt-50 32x4d on ImageNet-1k: SGD-Nesterov, batch 1024, 90 epochs, cosine, bf16 (the paper's recipe with
cosine decay instead of steps, plus label smoothing and zero-init residual BN).

    python -m train --config configs/resnext50.py --config.data_dir=/data/tfds
"""

from resnext_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model = "resnext50_32x4d"
    config.model_kwargs.zero_init_last = True
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.eval_resize_size = 256  # torchvision's V1 eval preset: resize 256, center-crop 224
    config.transform = "imagenet"
    config.half_precision = True
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.optimizer = "sgd"
    config.learning_rate = 0.4  # 0.1 per 256 images (Goyal et al.)
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.grad_clip_norm = 0.0
    config.label_smoothing = 0.1
    config.warmup_epochs = 5
    config.num_epochs = 90
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.worker_count = 8
    return config
