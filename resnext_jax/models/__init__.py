"""The networks and the layers they are built from (Flax linen, NHWC).

    from resnext_jax.models import ResNet, Bottleneck, ConvNormAct, ResidualBlock

Families: `ResNet` (ResNet, ResNeXt, Wide ResNet) and `RegNet`, both `Network`s sharing their fields. Blocks
are `ResidualBlock`s built from `conv`/`norm` definitions through the conv-norm unit `ConvNormAct`, each reading
top to bottom (its last unit takes the block's `shortcut` and `branch_end`). `init_variables`/`variable_shapes`
create a model's variables (or their shapes) the one way every tool does. `stack_blocks`/`unstack_blocks` convert
variables to and from the `scan_blocks` layout. Imports run one way: models -> ops -> cpu (the native kernels);
nothing here imports `resnext_jax.cpu`.
"""

from resnext_jax.models.init import init_variables, variable_shapes
from resnext_jax.models.layers import ACTIVATIONS, Conv2d, ConvNormAct, DropPath, SqueezeExcite
from resnext_jax.models.layout import stack_blocks, unstack_blocks
from resnext_jax.models.network import Network, ResidualBlock, drop_path_rates, se_features
from resnext_jax.models.norms import NORM_LAYERS, NORMS, BatchNorm, GroupNorm, norm_layer
from resnext_jax.models.registry import ModelInfo, create_model, list_models, model_info
from resnext_jax.models.regnet import RegNet, RegNetBlock, regnet_widths
from resnext_jax.models.resnet import BasicBlock, Bottleneck, ResNet, bottleneck_width

__all__ = [
    "ACTIVATIONS",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "Conv2d",
    "ConvNormAct",
    "DropPath",
    "GroupNorm",
    "ModelInfo",
    "NORMS",
    "NORM_LAYERS",
    "Network",
    "RegNet",
    "RegNetBlock",
    "ResNet",
    "ResidualBlock",
    "SqueezeExcite",
    "bottleneck_width",
    "create_model",
    "drop_path_rates",
    "init_variables",
    "list_models",
    "model_info",
    "norm_layer",
    "regnet_widths",
    "se_features",
    "stack_blocks",
    "unstack_blocks",
    "variable_shapes",
]
