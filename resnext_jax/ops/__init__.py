"""Low-level array ops used by the models (NHWC activations, HWIO kernels)."""
from resnext_jax.ops.compile import step_compiler_options
from resnext_jax.ops.grouped_conv import CONV_IMPLS, conv2d

__all__ = ["CONV_IMPLS", "conv2d", "step_compiler_options"]
