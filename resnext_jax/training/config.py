"""The training config schema: every field a run reads, its default, and validation.

Config files in `configs/` start from `default_config()` and change a few fields; `validate_config`
rejects unknown (e.g. misspelled) keys by name, with the closest known keys, before anything runs.
"""

from __future__ import annotations

import difflib
import json
import math

import ml_collections

from resnext_jax.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
    """Returns the full schema with defaults (ImageNet-style ResNeXt-50 training). All fields are documented here."""
    config = ml_collections.ConfigDict()
    # Model: any builder in resnext_jax.list_models(), plus create_model field overrides
    # (stage_sizes, cardinality, bottleneck_width, num_filters, small_stem, dropout_rate, drop_path_rate, ...).
    config.model = "resnext50_32x4d"
    config.model_kwargs = ml_collections.ConfigDict()
    config.half_precision = False  # bf16 compute; params, optimizer state, logits, loss and BN stats stay float32

    # Initialization: "" trains from scratch; a torchvision weight tag ("IMAGENET1K_V2") or a .pth path
    # loads the backbone through resnext_jax.convert.from_torchvision; a training workdir ("runs/pretrain", or
    # "runs/pretrain:latest" / ":ema" / ":1200") loads that run's backbone (resnext_jax.training.init_from).
    config.init_from = ""
    config.reinit_head = True  # new classifier head sized for the dataset (fine-tuning)
    config.freeze_bn = False  # keep BN running statistics and affine params fixed (fine-tuning)
    config.backbone_lr_mult = 1.0  # learning-rate multiplier for everything except the head ("fc")

    # Data (resnext_jax.data). batch sizes are GLOBAL: summed over all devices and processes.
    config.dataset = "imagenet2012"
    config.data_dir = ""  # "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    config.image_size = 224
    config.eval_resize_size = 0  # shorter side before the center crop; 0 = the loader's default
    config.normalize = "dataset"  # "dataset": the dataset's mean/std; "model": the model's (ImageNet, for weights)
    config.transform = "imagenet"  # imagenet | cifar | resize_crop | none
    config.augment = ""  # "" | randaugment | autoaugment
    config.batch_size = 256
    config.eval_batch_size = 256
    config.worker_count = 0  # grain worker processes per host (0 = in-process)
    config.prefetch = 2
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.label_smoothing = 0.0

    # Optimization.
    config.optimizer = "adamw"  # adamw | sgd (SGD with Nesterov momentum)
    config.learning_rate = 1e-3  # peak learning rate, reached after warmup
    config.end_learning_rate_ratio = 0.0  # cosine decays to learning_rate * this
    config.warmup_epochs = 5.0
    config.num_epochs = 90.0
    config.weight_decay = 0.05  # decoupled; never applied to norm scales or biases
    config.momentum = 0.9  # SGD momentum
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
    config.grad_accum_steps = 1  # split each per-device batch into this many sequential micro-batches
    config.ema_decay = 0.0  # EMA of the weights, evaluated beside the raw weights; 0 disables

    # Eval, logging, checkpoints.
    config.eval_every_epochs = 1  # also always at the end
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000  # plus one at every epoch end
    config.keep_checkpoints = 3  # the latest K; the best (eval top-1) one is kept as well
    config.progress_bar = True
    # Per-stage (stem, layer1..4, head) gradient and parameter norms every step, and the fraction of dead ReLU
    # units per stage on each logged batch (one extra forward pass per log step).
    config.stage_diagnostics = True
    config.write_report = True  # the evaluation report (resnext_jax.evaluate) in <workdir>/report at the end
    # Where metrics, the config and the report also go, besides metrics.jsonl: any of "tensorboard", "wandb",
    # "mlflow" (resnext_jax.training.trackers; W&B and MLflow need the track extra and read their own env settings).
    config.trackers = ("tensorboard",)
    # Multi-host: seconds after which a silent process counts as lost; every other process then exits (non-zero,
    # one line), and the distributed runtime's heartbeat and the checkpoint agreement are bounded by it.
    config.peer_timeout_s = 60.0
    config.seed = 0
    return config


# Fields that may differ between the run that wrote a workdir and the run that resumes it.
RESUMABLE_FIELDS = (
    "num_epochs",
    "eval_every_epochs",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "progress_bar",
    "worker_count",
    "prefetch",
    "data_dir",
    "eval_batch_size",
    "stage_diagnostics",
    "write_report",
    "trackers",
    "peer_timeout_s",
    "init_from_source",  # not a field: the record of config.init_from's run or file (training.init_from)
)

# Fields a run may change when resumed with `--allow_changes` (recorded in config_changes.jsonl): they change
# the schedule and the update, not the shapes of the state. grad_clip_norm may not switch between 0 (off) and on,
# which changes the optimizer state's structure.
CHANGEABLE_FIELDS = (
    "learning_rate",
    "end_learning_rate_ratio",
    "warmup_epochs",
    "num_epochs",
    "weight_decay",
    "grad_clip_norm",
    "label_smoothing",
    "mixup_alpha",
    "cutmix_alpha",
    "momentum",
    "adam_b1",
    "adam_b2",
)

_CHOICES = {
    "optimizer": ("adamw", "sgd"),
    "transform": ("imagenet", "cifar", "resize_crop", "none"),
    "augment": ("", "randaugment", "autoaugment"),
    "normalize": ("dataset", "model"),
}


# The allowed range of every numeric field that the integer check above does not cover: (low, high, hint), where a
# bound given as a list is exclusive ([0] means > 0) and a number inclusive; None is unbounded. NaN and infinity are
# never allowed (NaN passes every comparison, and a divergence message would advise rerunning with it).
_RANGES = {
    "num_epochs": ([0], None, ""),
    "learning_rate": ([0], None, "the peak learning rate, e.g. 1e-3"),
    "end_learning_rate_ratio": (0, 1, "the cosine ends at learning_rate * this"),
    "warmup_epochs": (0, None, "0 for no warmup"),
    "weight_decay": (0, None, "0 disables it"),
    "momentum": (0, [1], ""),
    "adam_b1": (0, [1], ""),
    "adam_b2": (0, [1], ""),
    "grad_clip_norm": (0, None, "0 disables clipping"),
    "ema_decay": (0, [1], "0 disables the EMA"),
    "label_smoothing": (0, [1], "1 would train towards the uniform distribution; 0.1 is usual"),
    "mixup_alpha": (0, None, "0 disables mixup"),
    "cutmix_alpha": (0, None, "0 disables CutMix"),
    "backbone_lr_mult": (0, None, "0 freezes the backbone"),
    "eval_resize_size": (0, None, "0 is the loader's default"),
    "worker_count": (0, None, "0 decodes in the training process"),
    "prefetch": (0, None, ""),
    "seed": (0, 2**31 - 1, "any non-negative integer"),
    "peer_timeout_s": (4, None, "seconds a silent process may take before the job stops; 60 by default"),
}


def _check_range(key: str, value, low, high, hint: str) -> None:
    """Raises a one-line ConfigError naming `key`, its value and the allowed range, for a value outside it."""
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    if not bad and low is not None:
        bad = value <= low[0] if isinstance(low, list) else value < low
    if not bad and high is not None:
        bad = value >= high[0] if isinstance(high, list) else value > high
    if bad:
        left = "unbounded" if low is None else f"({low[0]}" if isinstance(low, list) else f"[{low}"
        right = "inf)" if high is None else f"{high[0]})" if isinstance(high, list) else f"{high}]"
        allowed = f"{left}, {right}" if low is not None else f"at most {right}"
        raise ConfigError(
            f"config.{key}={value!r} is outside its range {allowed}"
            + (f" ({hint})" if hint else "")
            + f"; set --config.{key} to a value in that range"
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for unknown keys (naming the closest known keys) and out-of-range values."""
    known = default_config()
    for key in config.keys():
        if key not in known:
            close = difflib.get_close_matches(key, list(known.keys()), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint} Known keys: {', '.join(sorted(known.keys()))}")
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ConfigError(f"config.{key}={config[key]!r} is not supported; use one of {choices}")
    for key in (
        "batch_size",
        "eval_batch_size",
        "grad_accum_steps",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "eval_every_epochs",
        "image_size",
    ):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key}={config[key]} must be a positive integer")
    for key, (low, high, hint) in _RANGES.items():
        _check_range(key, config[key], low, high, hint)
    from resnext_jax.training.trackers import TRACKERS, tracker_names

    unknown = [name for name in tracker_names(config.trackers) if name not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"config.trackers names {unknown}; use any of {TRACKERS}, e.g. "
            f'--config.trackers=\'("tensorboard", "wandb")\''
        )


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe plain dict of the resolved config (tuples become lists)."""
    return json.loads(config.to_json())


def config_differences(saved: dict, current: dict) -> list[str]:
    """Fields (outside RESUMABLE_FIELDS) whose values differ, as 'key: saved -> current' lines."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_FIELDS:
            continue
        if saved.get(key, "<unset>") != current.get(key, "<unset>"):
            diffs.append(f"{key}: {saved.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}")
    return diffs
