"""Fields shared by every training config, with the values of a generic ImageNet recipe."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every field the training loop reads; recipe files change values, never add fields."""
    c = ml_collections.ConfigDict()
    c.arch = ""  # set from --arch
    # Model options, checked against the module's fields: --config.model.shortcut=C,
    # --config.model.widths='(8, 16, 32)'. Empty = the registered architecture as it is.
    c.model = ml_collections.ConfigDict()
    c.init_from = ""  # a training workdir or cnn_jax.convert output: fine-tune its latest weights

    # Data (cnn_jax.input_pipeline).
    c.dataset = "imagenet2012"
    c.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.image_size = 224
    c.augment = ""  # "" = the dataset's defaults; a preset ("inception", "vgg", "alexnet") and/or field=value
    c.prefetch = 2

    # Precision: "bfloat16" computes in bf16; parameters and optimizer state stay float32.
    # "float16" (GPUs without bf16) adds dynamic loss scaling: an overflowing step is skipped.
    c.dtype = "float32"

    # Optimization (cnn_jax.optim).
    c.seed = 0
    c.batch_size = 256  # global, over all devices and processes
    c.eval_batch_size = 0  # 0 = batch_size
    c.num_epochs = 90.0
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.optimizer = "sgd"  # sgd | nesterov | adamw | lars
    c.momentum = 0.9
    c.learning_rate = 0.1
    c.lr_reference_batch_size = 256  # lr scales by batch_size / this (0 = no scaling)
    c.lr_schedule = "step"  # step | cosine | constant
    c.warmup_epochs = 0.0
    c.lr_step_epochs = (30.0, 60.0)
    c.lr_step_factor = 0.1
    c.weight_decay = 1e-4
    c.weight_decay_skip_bn_bias = False
    c.grad_clip_norm = 0.0  # 0 = no clipping
    c.label_smoothing = 0.0
    c.aux_loss_weight = 0.3  # GoogLeNet's auxiliary classifiers
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.lars_trust_coefficient = 0.001
    # Each optimizer step averages the gradients of this many micro-batches of batch_size / k
    # (optax.MultiSteps): a batch-256 recipe on a device that fits 256 / k images.
    c.grad_accum_steps = 1

    # Exponential moving average of the weights and BN statistics (0 = off; e.g. 0.9999),
    # evaluated beside the raw weights ("eval_ema" in metrics.jsonl) and checkpointed.
    c.ema_decay = 0.0
    c.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (TF's EMA)
    c.best_metric = "top1"  # which val top-1 picks the kept best checkpoint: top1 | ema_top1

    # Batch-level augmentation in the train step (0 = off): mixup (Zhang et al. 2018) and CutMix
    # (Yun et al. 2019); with both on, each batch gets one of the two at random. Per-example ops
    # (TrivialAugment, RandAugment, random erasing) are `augment` options.
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0

    # Parallelism (cnn_jax.parallel).
    c.parallel = "pmap"  # pmap | shard_map
    c.cross_device_bn = False  # BN statistics over the global batch

    # Bookkeeping.
    c.log_every_steps = 100
    c.eval_every_steps = 0  # 0 = once per epoch (and at the end)
    c.checkpoint_every_steps = 0  # 0 = at every evaluation (and at the end)
    c.keep_checkpoints = 3  # the last K, plus the best by validation top-1
    c.async_checkpointing = True
    c.max_steps_per_run = 0  # > 0: save and exit after this many steps (re-run to continue)
    c.progress_bar = True
    c.profile_steps = ""  # "START:END": a jax.profiler trace of those steps into the workdir
    return c


def imagenet_recipe(*, augment: str, batch_size: int, num_epochs: float, learning_rate: float,
                    lr_reference_batch_size: int, lr_step_epochs, lr_step_factor: float = 0.1,
                    weight_decay: float, optimizer: str = "sgd") -> ml_collections.ConfigDict:
    """An ImageNet recipe of the papers: 224 px crops, momentum 0.9 and a step-decayed rate.

    The five papers' recipes differ only in these values, so each recipe file is one call.
    """
    c = base_config()
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.augment = augment
    c.batch_size = batch_size
    c.num_epochs = float(num_epochs)
    c.optimizer = optimizer
    c.momentum = 0.9
    c.learning_rate = learning_rate
    c.lr_reference_batch_size = lr_reference_batch_size  # 0 = the rate as given, whatever the batch
    c.lr_schedule = "step"
    c.lr_step_epochs = tuple(float(e) for e in lr_step_epochs)
    c.lr_step_factor = lr_step_factor
    c.weight_decay = weight_decay
    return c
