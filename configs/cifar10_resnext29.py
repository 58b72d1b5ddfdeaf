"""The paper's CIFAR-10 ResNeXt-29 8x64d (Xie et al. 2017, Table 7): 3x3 stem of 64, three stages of three
bottleneck blocks, cardinality 8, 64 channels per group at the first stage.

The generic ResNet gives exactly the paper's widths: grouped 3x3 widths 512/1024/2048, block outputs
256/512/1024, 34.43M parameters (paper: 34.4M). Training follows the paper (SGD momentum 0.9, batch 128,
weight decay 5e-4, 300 epochs, lr 0.1) except the learning rate decays with a cosine instead of /10 at
epochs 150 and 225, with Nesterov momentum and a short warmup.
"""

from resnext_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model = "resnext50_32x4d"
    config.model_kwargs.stage_sizes = (3, 3, 3)
    config.model_kwargs.num_filters = 64
    config.model_kwargs.cardinality = 8
    config.model_kwargs.bottleneck_width = 64
    config.model_kwargs.small_stem = True
    config.dataset = "cifar10"
    config.image_size = 32
    config.transform = "cifar"
    config.half_precision = True
    config.batch_size = 128
    config.eval_batch_size = 500
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.grad_clip_norm = 0.0
    config.warmup_epochs = 1
    config.num_epochs = 300
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.worker_count = 4
    return config
