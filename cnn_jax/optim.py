"""Optimizers, learning-rate schedules and weight-decay masks, all built from Optax parts.

Recipes: SGD with momentum (Krizhevsky et al. 2012; He et al. 2016), Nesterov momentum
(Sutskever et al. 2013), AdamW (Loshchilov & Hutter 2019), LARS for large batches (You et al. 2017),
linear warmup (Goyal et al. 2017) followed by cosine (Loshchilov & Hutter 2017) or step decay.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import optax

OPTIMIZERS = ("sgd", "nesterov", "adamw", "lars")
SCHEDULES = ("cosine", "step", "constant")


def peak_learning_rate(config: Any, global_batch_size: int) -> float:
    """``config.learning_rate``, scaled linearly by ``batch / lr_reference_batch_size`` when set.

    The linear scaling rule of Goyal et al. (2017): ResNet's lr 0.1 is for a batch of 256.
    """
    ref = int(config.get("lr_reference_batch_size", 0) or 0)
    return float(config.learning_rate) * (global_batch_size / ref if ref > 0 else 1.0)


def create_schedule(name: str, peak_value: float, total_steps: int, warmup_steps: int = 0,
                    boundaries: Sequence[int] = (), decay_factor: float = 0.1) -> optax.Schedule:
    """A linear warmup from 0 to ``peak_value`` followed by cosine, step or constant decay.

    ``boundaries`` are the steps (counted from 0, warmup included) where a step schedule
    multiplies the rate by ``decay_factor``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps <= 0:
        raise ValueError(f"the number of training steps must be positive, got {total_steps}")
    # Warmup ends before the last step, so that the decay has at least one step.
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
    if name == "cosine":
        if warmup_steps == 0:
            return optax.cosine_decay_schedule(peak_value, total_steps)
        return optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps, total_steps)
    if name == "step":
        main = optax.piecewise_constant_schedule(
            peak_value, {int(b) - warmup_steps: decay_factor for b in boundaries if b > warmup_steps})
    else:
        main = optax.constant_schedule(peak_value)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def schedule_uses_budget(config: Any) -> bool:
    """Whether a config's learning rate at a step depends on its number of training steps:
    the cosine decays to the budget's end, and warmup is cut short in a budget no longer than it
    (``create_schedule``); a constant or step schedule after warmup does not."""
    return (config.lr_schedule == "cosine" or float(config.warmup_epochs) >= float(config.num_epochs)
            or int(config.get("num_train_steps", -1) or -1) > 0)


def decay_mask(params: Any, skip_bn_and_bias: bool = True) -> Any:
    """True for the leaves weight decay applies to: every kernel, and unless skipped, the rest.

    BN scales/offsets and biases are the 1-D leaves of the tree; many recipes leave them undecayed
    (Goyal et al. 2017, Sec. 5.1 apply decay to all; the "no BN decay" trick is Jia et al. 2018).
    """
    return jax.tree_util.tree_map(lambda p: (not skip_bn_and_bias) or p.ndim > 1, params)


def create_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9,
                     weight_decay: float = 0.0, skip_bn_and_bias: bool = False,
                     grad_clip_norm: float = 0.0, adam_b1: float = 0.9, adam_b2: float = 0.999,
                     adam_eps: float = 1e-8, lars_trust_coefficient: float = 0.001
                     ) -> optax.GradientTransformation:
    """An Optax optimizer by name, with decoupled or L2 weight decay and optional global clipping.

    ``sgd``/``nesterov`` add ``weight_decay * param`` to the gradient before momentum (torch's
    SGD semantics); ``adamw`` decays decoupled from the adaptive step; ``lars`` applies decay and
    the trust ratio layer-wise, skipping 1-D parameters when ``skip_bn_and_bias``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    mask = lambda params: decay_mask(params, skip_bn_and_bias)  # noqa: E731
    if name in ("sgd", "nesterov"):
        parts = [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []
        parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=name == "nesterov"))
        tx = optax.chain(*parts)
    elif name == "adamw":
        tx = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                         weight_decay=weight_decay, mask=mask)
    else:
        tx = optax.lars(learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
                        trust_coefficient=lars_trust_coefficient, trust_ratio_mask=mask,
                        momentum=momentum)
    if grad_clip_norm and grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx


def accumulate(tx: optax.GradientTransformation, grad_accum_steps: int
               ) -> optax.GradientTransformation:
    """``tx`` applied to the mean gradient of every ``grad_accum_steps`` calls (optax.MultiSteps);
    the calls in between leave the parameters unchanged. 1 = ``tx`` itself."""
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"--config.grad_accum_steps must be >= 1, got {grad_accum_steps}")
    return tx if k == 1 else optax.MultiSteps(tx, every_k_schedule=k)


def from_config(config: Any, steps_per_epoch: int, total_steps: int, global_batch_size: int
                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and schedule of a training config (epochs converted to steps).

    Steps here are optimizer updates; with ``config.grad_accum_steps`` = k > 1 the optimizer is
    wrapped in ``optax.MultiSteps`` and each update takes k micro-batches of ``batch / k``.
    """
    peak = peak_learning_rate(config, global_batch_size)
    warmup = int(round(float(config.warmup_epochs) * steps_per_epoch))
    boundaries = [int(round(float(e) * steps_per_epoch)) for e in (config.lr_step_epochs or ())]
    schedule = create_schedule(config.lr_schedule, peak, total_steps, warmup, boundaries,
                               float(config.lr_step_factor))
    tx = create_optimizer(
        config.optimizer, schedule, momentum=float(config.momentum),
        weight_decay=float(config.weight_decay),
        skip_bn_and_bias=bool(config.weight_decay_skip_bn_bias),
        grad_clip_norm=float(config.grad_clip_norm), adam_b1=float(config.adam_b1),
        adam_b2=float(config.adam_b2), adam_eps=float(config.adam_eps),
        lars_trust_coefficient=float(config.lars_trust_coefficient))
    return accumulate(tx, int(config.get("grad_accum_steps", 1) or 1)), schedule


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
    """Full batches per epoch (the iterator drops the remainder); at least 1."""
    return max(1, num_train_examples // global_batch_size)


def total_train_steps(config: Any, num_train_examples: int, global_batch_size: int) -> int:
    """``config.num_train_steps`` if positive, else ``ceil(num_epochs * steps_per_epoch)``."""
    if int(config.get("num_train_steps", -1) or -1) > 0:
        return int(config.num_train_steps)
    return int(math.ceil(float(config.num_epochs) * steps_per_epoch(num_train_examples,
                                                                    global_batch_size)))

