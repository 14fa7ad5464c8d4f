"""VGG on ImageNet (Simonyan & Zisserman 2015, Sec. 3.1): SGD, batch 256, momentum 0.9,
weight decay 5e-4, lr 0.01 divided by 10 three times (on plateaus; here at fixed epochs), 74
epochs; scale jittering S in [256, 512] with 224 crops and flips."""

from cnn_jax.configs.common import base_config


def get_config(arch: str = ""):
    c = base_config()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.augment = "vgg"
    c.batch_size = 256
    c.num_epochs = 74.0
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.learning_rate = 0.01
    c.lr_reference_batch_size = 0
    c.lr_schedule = "step"
    c.lr_step_epochs = (30.0, 50.0, 65.0)
    c.lr_step_factor = 0.1
    c.weight_decay = 5e-4
    return c
