"""Thin entry point: `python -m train --config configs/quickstart.py`; the loop lives in resnext_jax.training."""
