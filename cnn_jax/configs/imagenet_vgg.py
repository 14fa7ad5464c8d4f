"""VGG on ImageNet (Simonyan & Zisserman 2015, Sec. 3.1): SGD, batch 256, momentum 0.9,
weight decay 5e-4, lr 0.01 divided by 10 three times (on plateaus; here at fixed epochs), 74
epochs; scale jittering S in [256, 512] with 224 crops and flips."""

from cnn_jax.configs.common import imagenet_recipe


def get_config(arch: str = ""):
    # lr divided by 10 on plateaus in the paper: here at fixed epochs.
    return imagenet_recipe(augment="vgg", batch_size=256, num_epochs=74, learning_rate=0.01,
                           lr_reference_batch_size=0, lr_step_epochs=(30, 50, 65),
                           weight_decay=5e-4)
