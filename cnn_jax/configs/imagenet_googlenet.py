"""GoogLeNet on ImageNet (Szegedy et al. 2015, Sec. 6): SGD with momentum 0.9, the learning
rate decreased by 4% every 8 epochs, auxiliary classifiers' losses added with weight 0.3;
Inception crops (8%-100% of the area, 3/4-4/3 aspect) and flips.

The paper gives no base rate or batch (asynchronous DistBelief training); here lr 0.1 x batch/256
for the batch-normalized torchvision layout, weight decay 1e-4, and 120 epochs so that the slow
decay ends at 0.96^14 ~ 0.56 of the peak. ``--config.lr_schedule=cosine`` is the faster alternative.
"""

from cnn_jax.configs.common import imagenet_recipe


def get_config(arch: str = ""):
    from cnn_jax.models import list_models, model_info

    # No batch norm (the paper layout): a 10x smaller rate.
    has_batch_norm = model_info(arch).has_batch_norm if arch in list_models() else True
    c = imagenet_recipe(augment="inception", batch_size=256, num_epochs=120,
                        learning_rate=0.1 if has_batch_norm else 0.01,
                        lr_reference_batch_size=256, lr_step_epochs=range(8, 120, 8),
                        lr_step_factor=0.96, weight_decay=1e-4)
    c.aux_loss_weight = 0.3
    return c
