"""resnext-jax: ResNet, ResNeXt, Wide ResNet and RegNet in Flax linen.

import resnext_jax
model = resnext_jax.create_model("resnext50_32x4d", num_classes=10)
variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
logits = model.apply(variables, images, train=False)   # images: NHWC float
loaded = resnext_jax.load_model("runs/quickstart")     # a trained run, or a .pth with model=NAME
"""

from resnext_jax.inference.loader import load_model
from resnext_jax.models.registry import create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "load_model", "model_info"]
