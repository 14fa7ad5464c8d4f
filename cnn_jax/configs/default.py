"""Default config: the built-in `shapes` dataset at 32 px and a short schedule for a 2-core CPU.

``python -m cnn_jax.train --arch=resnet18`` trains 4 epochs of the 10,000 training images:
AdamW with warmup and cosine decay, which learns this task in far fewer epochs than SGD at these
step counts; centre crops with flips only (random-resized crops slow short runs down). Networks
without batch norm (AlexNet, the paper's GoogLeNet) get a smaller learning rate; VGG trains with
the paper's SGD with momentum (see below); networks whose registry entry needs more than 32 px
(AlexNet: 63) run at the next multiple of 32.
"""

from cnn_jax.configs.common import base_config

IMAGE_SIZE = 32


def get_config(arch: str = ""):
    from cnn_jax.models import list_models, model_info

    info = model_info(arch) if arch in list_models() else None
    has_batch_norm = info.has_batch_norm if info else True
    c = base_config()
    c.dataset = "shapes"
    c.image_size = max(IMAGE_SIZE, -(-(info.min_input_size if info else 0) // 32) * 32)
    c.augment = "none,flip=true"

    c.batch_size = 64
    # resnet18 on 2 CPU cores (AVX2, 2026-12-02; deterministic per machine): 3.5 epochs at lr 3e-3
    # 91.4% val top-1, at 1e-3 also 91.4% (but 51.7/75.0% after epochs 1/2 against 33.9/66.4%),
    # 4 epochs at 1e-3 94.35% (the last half epoch, at the cosine's tail, adds most). Earlier, on
    # an AVX-512 machine: 3.5 epochs at 3e-3 93.85% in 2m55s, 94.7% at another commit.
    c.num_epochs = 4.0
    c.optimizer = "adamw"
    c.learning_rate = 1e-3 if has_batch_norm else 5e-4
    if info and info.family == "vgg":
        # VGG's fc6 reads 25,088 non-negative inputs (512 x 7 x 7; at 32 px the 1x1 map repeated).
        # AdamW moves every weight by about the learning rate per step whatever its gradient, so
        # one step moves an fc6 unit's pre-activation by up to lr x sum|x|, ~12 at 1e-3, for all
        # inputs alike: the units die and the loss stays at ln 10 from step ~100 (vgg11_bn at
        # 1e-3, 3e-4 and 1e-4, vgg11 at 5e-4, 2026-12-06). SGD's step follows the gradient;
        # Simonyan & Zisserman's rate (0.03 died too). 4 epochs, AMD AVX-512 host: vgg11_bn
        # 84.70% val top-1 (chance with AdamW); vgg11 39.90%, still climbing (no batch norm:
        # 11.8% and 11.5% after epochs 1 and 2; the paper grew its deep plain nets from net A).
        c.optimizer = "sgd"
        c.learning_rate = 1e-2
    c.lr_reference_batch_size = 0
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0.3
    c.weight_decay = 1e-4
    c.weight_decay_skip_bn_bias = True
    c.grad_clip_norm = 5.0

    c.log_every_steps = 20
    c.eval_every_steps = 0  # every epoch (and at the end)
    return c
