"""Up-front checks of a training config: every field a run reads, before anything is written.

A mistyped field, a value of the wrong type, a value outside its range (a zero or negative
learning rate), an unknown choice, a model option the architecture does not have, or a path that
is a file where a directory is needed is a one-line ``ValueError`` saying what to pass instead.
Fields are known from :func:`cnn_jax.configs.common.base_config`, so a field added there is
checked for name and type without touching this file; its range goes in ``_RULES``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Optional

import ml_collections

# The compute dtypes a run accepts (models, input pipeline and benchmark read this one table).
DTYPES = ("float32", "bfloat16", "float16")


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0 <= v < 1


# field -> (test, what the value must be). Choices are checked in validate() (they live in the
# modules that implement them).
_RULES: Dict[str, tuple] = {
    "image_size": (_positive, "a positive number of pixels"),
    "prefetch": (_non_negative, ">= 0"),
    "batch_size": (_positive, "positive"),
    "eval_batch_size": (_non_negative, ">= 0 (0 = batch_size)"),
    "num_epochs": (_positive, "positive (or set num_train_steps)"),
    "momentum": (_fraction, "in [0, 1)"),
    "learning_rate": (_positive, "positive"),
    "lr_reference_batch_size": (_non_negative, ">= 0 (0 = no scaling)"),
    "warmup_epochs": (_non_negative, ">= 0"),
    "lr_step_factor": (_positive, "positive"),
    "weight_decay": (_non_negative, ">= 0"),
    "grad_clip_norm": (_non_negative, ">= 0 (0 = no clipping)"),
    "label_smoothing": (_fraction, "in [0, 1)"),
    "aux_loss_weight": (_non_negative, ">= 0"),
    "adam_b1": (_fraction, "in [0, 1)"),
    "adam_b2": (_fraction, "in [0, 1)"),
    "adam_eps": (_positive, "positive"),
    "lars_trust_coefficient": (_positive, "positive"),
    "log_every_steps": (_positive, "positive"),
    "eval_every_steps": (_non_negative, ">= 0 (0 = once per epoch)"),
    "checkpoint_every_steps": (_non_negative, ">= 0 (0 = at every evaluation)"),
    "keep_checkpoints": (_positive, "positive"),
    "max_steps_per_run": (_non_negative, ">= 0 (0 = no limit)"),
    # grad_accum_steps, ema_decay, mixup/cutmix alphas: checked by train_lib, also up front.
}


def _flat(config: Any, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)) and key != "model":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def check_dir(flag: str, path: str) -> None:
    """``path`` must be a directory or creatable as one: not a file, not under a file."""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise ValueError(f"{flag}={path} is {'a file' if probe == path else f'under the file {probe}'}"
                         f"; pass a directory")


def validate(config: ml_collections.ConfigDict, workdir: Optional[str] = None,
             check_paths: bool = True) -> None:
    """Raise a one-line ValueError for the first problem in ``config`` (and ``workdir``); types
    ``config.model``'s options in place."""
    from cnn_jax import optim, parallel
    from cnn_jax.configs.common import base_config
    from cnn_jax.models import check_model_options, create_model, list_models, model_info

    known = _flat(base_config())
    given = _flat(config)
    for key in given:
        if key == "model_kwargs":
            raise ValueError("--config.model_kwargs is gone: pass model options as "
                             "--config.model.FIELD=VALUE (e.g. --config.model.shortcut=C)")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = (f"did you mean --config.{close[0]}?" if close else
                    "model options go in --config.model.FIELD")
            raise ValueError(f"unknown config field --config.{key}; {hint}")
    for key, value in given.items():
        default = known[key]
        if key != "model" and not _type_ok(value, default):
            raise ValueError(f"--config.{key}={value!r} must be a {type(default).__name__} "
                             f"(default {default!r})")
        rule = _RULES.get(key)
        if rule and not (key == "num_epochs" and config.get("num_train_steps", -1) > 0):
            test, want = rule
            if not test(value):
                raise ValueError(f"--config.{key}={value!r} must be {want}")

    if not config.arch:
        raise ValueError("no architecture given: pass --arch=<name> (e.g. --arch=resnet18)")
    if config.arch not in list_models():
        model_info(config.arch)  # the registry's error, listing the valid names
    options = check_model_options(config.arch, dict(config.get("model") or {}))
    create_model(config.arch, **options)  # the module's own checks of option values
    # Typed (``'4'`` -> 4), so that the checkpoint stores what the model was built with.
    config.model = ml_collections.ConfigDict(options)
    info = model_info(config.arch)
    if config.image_size < info.min_input_size:
        raise ValueError(f"--config.image_size={config.image_size} is too small for "
                         f"{config.arch}: its registry entry needs at least "
                         f"{info.min_input_size} px")

    choices: Dict[str, tuple] = {"optimizer": ("optimizer", optim.OPTIMIZERS),
                                 "lr_schedule": ("lr_schedule", optim.SCHEDULES),
                                 "parallel": ("parallel mode", parallel.MODES),
                                 "dtype": ("dtype", DTYPES)}
    for key, (what, valid) in choices.items():
        if config[key] not in valid:
            raise ValueError(f"unknown {what} {config[key]!r} (--config.{key}); choose one of "
                             f"{', '.join(valid)}")
    import jax

    devices = jax.device_count()
    parallel.check_batch_size(config.batch_size, devices)
    if config.eval_batch_size % devices:  # evaluation would fail only after training
        raise ValueError(f"--config.eval_batch_size={config.eval_batch_size} is not divisible "
                         f"by the {devices} devices; pass a multiple of {devices}")
    steps = list(config.lr_step_epochs)
    if any(e < 0 for e in steps) or steps != sorted(steps):
        raise ValueError(f"--config.lr_step_epochs={tuple(steps)} must be increasing epochs >= 0")
    if config.augment:
        from cnn_jax import preprocessing

        preprocessing.parse_augment(config.augment)

    if check_paths:
        if workdir is not None:
            check_dir("--workdir", workdir)
        if config.data_dir:
            check_dir("--data_dir", config.data_dir)
        if config.init_from and not os.path.isdir(os.path.expanduser(config.init_from)):
            raise ValueError(f"--config.init_from={config.init_from} is not a directory: pass a "
                             "training workdir or the output of python -m cnn_jax.convert")

