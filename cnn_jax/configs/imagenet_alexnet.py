"""AlexNet on ImageNet (Krizhevsky et al. 2012, Sec. 5): SGD, batch 128, momentum 0.9,
weight decay 5e-4, lr 0.01 divided by 10 three times over ~90 epochs; random 224 crops of the
256 image, flips and PCA lighting noise (Sec. 4.1)."""

from cnn_jax.configs.common import base_config


def get_config(arch: str = ""):
    c = base_config()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.augment = "alexnet"
    c.batch_size = 128
    c.num_epochs = 90.0
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.learning_rate = 0.01
    c.lr_reference_batch_size = 0  # the paper's lr, whatever the batch
    c.lr_schedule = "step"
    c.lr_step_epochs = (30.0, 60.0, 80.0)  # the paper divided on plateaus, three times
    c.lr_step_factor = 0.1
    c.weight_decay = 5e-4
    return c
