"""Data-parallel training: config schema, optimizer, shard_map train step, Orbax checkpoints, logging, the loop.

    from resnext_jax.training import default_config, train_and_evaluate
    config = default_config(); config.dataset = "digits"; ...
    summary = train_and_evaluate(config, "/tmp/run")    # rerun to resume

See docs/training.md.
"""

from resnext_jax.run_files import read_metrics
from resnext_jax.training.config import ConfigError, default_config, validate_config
from resnext_jax.training.loop import build_model, evaluate, train_and_evaluate

__all__ = [
    "ConfigError",
    "build_model",
    "default_config",
    "evaluate",
    "read_metrics",
    "train_and_evaluate",
    "validate_config",
]
