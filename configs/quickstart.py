"""Quick start: a small ResNeXt (8 groups) on the embedded `digits` data; under a minute on a 2-core CPU.

    python -m train --config configs/quickstart.py          # ~98-99 % eval top-1

digits are 8x8 scans (scikit-learn), so 16x16 input loses nothing and keeps each step cheap.
"""

from resnext_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model = "resnext50_32x4d"
    # Two stages of one bottleneck block each and the 3x3 stride-1 stem for small images:
    # widths 16 -> (3x3 32 = 8 groups x 4) -> 64 -> (3x3 64 = 8 x 8) -> 128.
    config.model_kwargs.stage_sizes = (1, 1)
    config.model_kwargs.num_filters = 16
    config.model_kwargs.cardinality = 8
    config.model_kwargs.bottleneck_width = 16
    config.model_kwargs.small_stem = True
    config.dataset = "digits"
    config.image_size = 16
    config.transform = "none"
    config.batch_size = 32
    config.eval_batch_size = 128
    config.optimizer = "adamw"
    config.learning_rate = 5e-3
    config.weight_decay = 0.05
    config.warmup_epochs = 1
    config.num_epochs = 8
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 2
    return config
