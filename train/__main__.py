"""`python -m train --config configs/<name>.py [--config.field=value ...] [--workdir DIR]` (see docs/training.md)."""

from resnext_jax.training.cli import console_main

if __name__ == "__main__":
    console_main()
