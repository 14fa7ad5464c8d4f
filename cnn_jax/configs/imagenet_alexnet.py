"""AlexNet on ImageNet (Krizhevsky et al. 2012, Sec. 5): SGD, batch 128, momentum 0.9,
weight decay 5e-4, lr 0.01 divided by 10 three times over ~90 epochs; random 224 crops of the
256 image, flips and PCA lighting noise (Sec. 4.1)."""

from cnn_jax.configs.common import imagenet_recipe


def get_config(arch: str = ""):
    # lr divided by 10 on plateaus, three times in the paper: here at fixed epochs.
    return imagenet_recipe(augment="alexnet", batch_size=128, num_epochs=90, learning_rate=0.01,
                           lr_reference_batch_size=0, lr_step_epochs=(30, 60, 80),
                           weight_decay=5e-4)
