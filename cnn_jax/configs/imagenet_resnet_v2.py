"""ResNet on ImageNet with torchvision's "new training recipe" (the IMAGENET1K_V2 weights).

Source: V. Vryniotis, "How to Train State-Of-The-Art Models Using TorchVision's Latest
Primitives", PyTorch blog, Nov. 2021 (https://pytorch.org/blog/how-to-train-state-of-the-art-models-using-torchvision-latest-primitives/),
and the ResNet50 command of https://github.com/pytorch/vision/tree/main/references/classification:

    --batch-size 128 (x 8 GPUs) --lr 0.5 --lr-scheduler cosineannealinglr --lr-warmup-epochs 5
    --lr-warmup-method linear --auto-augment ta_wide --epochs 600 --random-erase 0.1
    --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2
    --cutmix-alpha 1.0 --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler
    --ra-reps 4

``python -m cnn_jax.train --arch=resnet50 --dataset=imagenet2012
--config=cnn_jax/configs/imagenet_resnet_v2.py``; on one small device add
``--config.grad_accum_steps=8`` (8 micro-batches of 128 per step of 1024).

What differs from torchvision: warmup starts at 0, not at 0.01 x lr; the EMA is updated every
step with the per-step equivalent of torchvision's decay (0.99998 adjusted for 32-step updates at
batch 1024: 1 - (1 - 0.99998) * 1024 * 32 / 600 per 32 steps, i.e. 0.999966 per step) and is not
reset during warmup; weight decay also skips the biases (torchvision skips only the norm layers;
ResNet's only bias is the classifier's); no repeated-augmentation sampler (--ra-sampler); training
and the evaluation during training both use 176 px (torchvision evaluates at 224 after a 232
resize, the "FixRes" effect worth about +1.5% top-1).
"""

from cnn_jax.configs.common import base_config


def get_config(arch: str = ""):
    del arch  # the recipe is the same for every ResNet
    c = base_config()
    c.dataset = "imagenet2012"
    c.image_size = 176  # --train-crop-size 176
    c.augment = "torchvision_v2"  # Inception crop, flip, TrivialAugmentWide, random erasing 0.1
    c.mixup_alpha = 0.2
    c.cutmix_alpha = 1.0
    c.label_smoothing = 0.1

    c.batch_size = 1024  # 8 x 128
    c.num_epochs = 600.0
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.learning_rate = 0.5
    c.lr_reference_batch_size = 1024  # linear scaling for other batch sizes
    c.lr_schedule = "cosine"
    c.warmup_epochs = 5.0
    c.weight_decay = 2e-5
    c.weight_decay_skip_bn_bias = True  # --norm-weight-decay 0.0

    c.ema_decay = 0.999966  # --model-ema (see the docstring for the conversion)
    c.ema_warmup = False
    c.best_metric = "ema_top1"
    return c
