"""Low-level array ops used by the models (NHWC activations, HWIO kernels)."""

from resnext_jax.ops.compile import inference_compiler_options, step_compiler_options
from resnext_jax.ops.grouped_conv import CONV_IMPLS, conv2d

__all__ = ["CONV_IMPLS", "conv2d", "inference_compiler_options", "step_compiler_options"]
