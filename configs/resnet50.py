"""ResNet-50 on ImageNet-1k with the ResNeXt-50 recipe (configs/resnext50.py), for a like-for-like comparison."""

from configs import resnext50


def get_config():
    config = resnext50.get_config()
    config.model = "resnet50"
    return config
