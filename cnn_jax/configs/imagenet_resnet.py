"""ResNet on ImageNet (He et al. 2016, Sec. 3.4; torchvision's reference recipe): SGD, momentum
0.9, lr 0.1 x batch/256, weight decay 1e-4, 90 epochs, lr / 10 at epochs 30 and 60; Inception
crops and flips.

Cosine with warmup instead (Goyal et al. 2017; Loshchilov & Hutter 2017):
``--config.lr_schedule=cosine --config.warmup_epochs=5``.
"""

from cnn_jax.configs.common import imagenet_recipe


def get_config(arch: str = ""):
    # lr_reference_batch_size=256: the linear scaling rule, 0.1 x batch / 256.
    return imagenet_recipe(augment="inception", batch_size=256, num_epochs=90, learning_rate=0.1,
                           lr_reference_batch_size=256, lr_step_epochs=(30, 60),
                           weight_decay=1e-4)
