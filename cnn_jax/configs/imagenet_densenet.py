"""DenseNet on ImageNet (Huang et al. 2017, Sec. 4.2): SGD with Nesterov momentum 0.9, batch
256, lr 0.1 (x batch/256), lr / 10 at epochs 30 and 60 of 90, weight decay 1e-4.

Cosine with warmup instead: ``--config.lr_schedule=cosine --config.warmup_epochs=5``.
"""

from cnn_jax.configs.common import base_config


def get_config(arch: str = ""):
    c = base_config()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.augment = "inception"
    c.batch_size = 256
    c.num_epochs = 90.0
    c.optimizer = "nesterov"
    c.momentum = 0.9
    c.learning_rate = 0.1
    c.lr_reference_batch_size = 256
    c.lr_schedule = "step"
    c.lr_step_epochs = (30.0, 60.0)
    c.lr_step_factor = 0.1
    c.weight_decay = 1e-4
    return c
