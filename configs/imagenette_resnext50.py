"""ResNeXt-50 32x4d from scratch on Imagenette (10 ImageNet classes): AdamW, cosine, label smoothing 0.1,
dropout 0.5 before the head, AutoAugment.

    python -m train --config configs/imagenette_resnext50.py
"""

from resnext_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model = "resnext50_32x4d"
    config.model_kwargs.dropout_rate = 0.5
    config.model_kwargs.zero_init_last = True
    config.dataset = "imagenette/320px-v2"
    config.image_size = 224
    config.eval_resize_size = 256
    config.transform = "imagenet"
    config.augment = "autoaugment"
    config.half_precision = True
    config.batch_size = 128
    config.eval_batch_size = 256
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 0.05
    config.label_smoothing = 0.1
    config.grad_clip_norm = 1.0
    config.warmup_epochs = 5
    config.num_epochs = 100
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    config.worker_count = 4
    return config
