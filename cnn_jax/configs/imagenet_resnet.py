"""ResNet on ImageNet (He et al. 2016, Sec. 3.4; torchvision's reference recipe): SGD, momentum
0.9, lr 0.1 x batch/256, weight decay 1e-4, 90 epochs, lr / 10 at epochs 30 and 60; Inception
crops and flips.

Cosine with warmup instead (Goyal et al. 2017; Loshchilov & Hutter 2017):
``--config.lr_schedule=cosine --config.warmup_epochs=5``.
"""

from cnn_jax.configs.common import base_config


def get_config(arch: str = ""):
    c = base_config()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.augment = "inception"
    c.batch_size = 256
    c.num_epochs = 90.0
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.learning_rate = 0.1
    c.lr_reference_batch_size = 256  # linear scaling rule: 0.1 x batch / 256
    c.lr_schedule = "step"
    c.lr_step_epochs = (30.0, 60.0)
    c.lr_step_factor = 0.1
    c.warmup_epochs = 0.0
    c.weight_decay = 1e-4
    return c
