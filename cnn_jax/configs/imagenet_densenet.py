"""DenseNet on ImageNet (Huang et al. 2017, Sec. 4.2): SGD with Nesterov momentum 0.9, batch
256, lr 0.1 (x batch/256), lr / 10 at epochs 30 and 60 of 90, weight decay 1e-4.

Cosine with warmup instead: ``--config.lr_schedule=cosine --config.warmup_epochs=5``.
"""

from cnn_jax.configs.common import imagenet_recipe


def get_config(arch: str = ""):
    return imagenet_recipe(augment="inception", batch_size=256, num_epochs=90, learning_rate=0.1,
                           lr_reference_batch_size=256, lr_step_epochs=(30, 60),
                           weight_decay=1e-4, optimizer="nesterov")
