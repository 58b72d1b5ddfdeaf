"""Fine-tune torchvision's ResNeXt-50 32x4d (IMAGENET1K_V2) on your own images, prepared with `prepare folder`:
converted weights, a new head sized for your classes, the backbone at a tenth of the head's learning rate,
ImageNet normalization (what the weights expect), 224x224 crops.

    python -m resnext_jax.data.prepare folder ~/photos --name my_photos      # ~/photos/<class>/<image>.jpg
    python -m train --config configs/finetune_folder.py --config.dataset=my_photos --workdir runs/my_photos
    python -m train --config configs/finetune_folder.py:scratch --config.dataset=my_photos --workdir runs/scratch

The weight tag needs the torch extra (`pip install -e '.[torch]'`) and network access once (torch hub cache).
Offline, pass a downloaded file with --config.init_from=/path/resnext50_32x4d-1a0047aa.pth, one of your own runs
with --config.init_from=runs/pretrain (its backbone, a new head), or train from scratch: `:scratch` after the file
name sets init_from="" (random init), the backbone at the full learning rate and your data's own normalization.
With fewer than a few thousand images, keep the epochs low and consider --config.freeze_bn=True (small batches make
poor BatchNorm statistics).
"""

from resnext_jax.training.config import default_config


def get_config(mode: str | None = None):
    """`mode` (after a colon on the command line): None fine-tunes IMAGENET1K_V2, "scratch" trains from random init."""
    if mode not in (None, "", "scratch"):
        raise ValueError(f"configs/finetune_folder.py:{mode}: use configs/finetune_folder.py or :scratch")
    config = default_config()
    config.model = "resnext50_32x4d"
    config.init_from = "IMAGENET1K_V2"
    config.reinit_head = True
    config.backbone_lr_mult = 0.1
    config.dataset = "my_photos"  # the --name you gave `prepare folder`; override with --config.dataset=NAME
    config.normalize = "model"
    config.image_size = 224
    config.eval_resize_size = 232  # the V2 weights' eval preset: shorter side 232, center crop 224
    config.transform = "imagenet"
    config.augment = "randaugment"
    # float32: this config is meant to run on a laptop too, where bfloat16 is 4.6x slower per epoch (XLA:CPU has
    # no fast bf16 convolutions); on a GPU or TPU pass --config.half_precision=True.
    config.half_precision = False
    config.batch_size = 32
    config.eval_batch_size = 64
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.warmup_epochs = 1
    config.num_epochs = 10
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500
    config.worker_count = 4
    if mode == "scratch":  # nothing pretrained: every layer learns at the full rate, on the data's own statistics
        config.init_from = ""
        config.backbone_lr_mult = 1.0
        config.normalize = "dataset"
    return config
