"""RegNetY-1.6GF on ImageNet-1k: the ResNeXt-50 recipe with RegNet's lighter weight decay and 100 epochs."""

from configs import resnext50


def get_config():
    config = resnext50.get_config()
    config.model = "regnet_y_1_6gf"
    config.model_kwargs.zero_init_last = False
    config.weight_decay = 5e-5
    config.learning_rate = 0.8
    config.num_epochs = 100
    return config
