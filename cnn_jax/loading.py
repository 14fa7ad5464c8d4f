"""Load a model and its weights from any workdir: a training run's or ``cnn_jax.convert``'s.

:func:`load` is the one place where predict, evaluate, export and fine-tuning get a checkpoint's
variables (raw or, with ``ema=True``, the exponential moving average of the weights; training
runs through :func:`cnn_jax.checkpoint.load_variables`). Everything inference needs comes from
what the checkpoint stored: the architecture and model options (the config), the class count and names, the image
size and the evaluation preprocessing (normalization and centre-crop ratio; checkpoints written
before these were recorded fall back to the dataset's).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from cnn_jax import checkpoint as ckpt_lib


class Loaded(NamedTuple):
    model: Any  # the Flax module, float32 compute
    variables: Dict[str, Any]  # params (+ batch_stats), host arrays
    meta: Dict[str, Any]
    config: Any  # the run's ml_collections config
    step: int
    class_names: Tuple[str, ...]
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    eval_crop_ratio: float


def resolve_step(checkpointer: ckpt_lib.Checkpointer, checkpoint: str = "latest") -> int:
    """``'latest'``, ``'best'`` (by validation top-1) or a step number -> an existing step."""
    checkpoint = str(checkpoint or "latest").strip()
    steps = checkpointer.all_steps()
    if not steps:
        raise ValueError(f"no checkpoint in {checkpointer.directory}: pass the --workdir of a "
                         "training run (python -m cnn_jax.train) or of python -m cnn_jax.convert")
    if checkpoint == "latest":
        return checkpointer.latest_step()
    if checkpoint == "best":
        step = checkpointer.best_step()
        if step is None:
            raise ValueError(f"{checkpointer.directory} has no evaluated checkpoint to call best "
                             f"(steps {steps}); pass --checkpoint=latest or a step")
        return step
    if checkpoint.isdigit():
        if int(checkpoint) not in steps:
            raise ValueError(f"no checkpoint at step {checkpoint} in {checkpointer.directory}; "
                             f"there are {steps}")
        return int(checkpoint)
    raise ValueError(f"--checkpoint must be 'latest', 'best' or a step number, got {checkpoint!r}")


def _config_of(meta: Mapping[str, Any]):
    import ml_collections

    return ml_collections.ConfigDict(meta["config"])


def class_names(meta: Mapping[str, Any], num_classes: int) -> Tuple[str, ...]:
    """The checkpoint's class names; ImageNet's for 1000 classes or synsets; else 'class i'."""
    from cnn_jax import imagenet_classes

    names = tuple(meta.get("class_names") or ())
    if num_classes == 1000 and (not names or names == imagenet_classes.synsets()):
        return imagenet_classes.class_names()
    if len(names) == num_classes:
        return names
    return tuple(f"class {i}" for i in range(num_classes))


def _dataset_preprocessing(dataset: str) -> Tuple[tuple, tuple, float]:
    """Normalization of a built-in dataset, for checkpoints that did not record it."""
    from cnn_jax.datasets import sources

    try:
        spec = sources.SPECS.get(sources.split_name(dataset)[0], sources.DatasetSpec())
    except ValueError:
        spec = sources.DatasetSpec()
    return spec.mean, spec.std, spec.eval_crop_ratio


def variable_shapes(model: Any, image_size: int) -> Dict[str, Any]:
    """Shapes of ``params`` (and ``batch_stats``) as training creates them, computing nothing."""
    from cnn_jax.models import abstract_variables

    # train=True: every head has parameters, as in training.
    shapes = abstract_variables(model, image_size, train=True)
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


def _open(workdir: str) -> ckpt_lib.Checkpointer:
    """A read-only Checkpointer that ranks 'best' by the run's own best-checkpoint metric."""
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    latest = checkpointer.latest_step()
    config = ((checkpointer.read_meta(latest) or {}).get("config") or {}) if latest else {}
    metric = config.get("best_metric", ckpt_lib.BEST_METRIC)
    if metric == ckpt_lib.BEST_METRIC or metric not in ckpt_lib.BEST_METRICS:
        return checkpointer
    checkpointer.close()
    return ckpt_lib.Checkpointer(workdir, read_only=True, best_metric=metric)


def load(workdir: str, checkpoint: str = "latest", arch: Optional[str] = None,
         dtype: Optional[str] = "float32", ema: bool = False) -> Loaded:
    """Model, variables and preprocessing of ``workdir``'s checkpoint (see the module docstring).

    ``arch``, when given, must be the checkpoint's architecture. ``dtype``: the model's compute
    dtype (parameters stay float32); None keeps the training config's. ``ema``: the exponential
    moving average of the weights and BN statistics (``--config.ema_decay``) instead.
    """
    from cnn_jax import convert, train_lib

    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
        raise ValueError(f"{workdir} holds no checkpoints/ folder: pass the --workdir of a "
                         "training run (python -m cnn_jax.train) or of python -m cnn_jax.convert")
    checkpointer = _open(workdir)
    try:
        step = resolve_step(checkpointer, checkpoint)
        meta = checkpointer.read_meta(step)
        if arch and meta.get("arch") != arch:
            raise ckpt_lib.CheckpointMismatchError(
                f"{checkpointer.directory} holds a checkpoint of arch={meta.get('arch')!r}, "
                f"not {arch!r}")
        config = _config_of(meta)
        num_classes = int(meta["num_classes"])
        if dtype:
            config.dtype = dtype
        if convert.is_converted(meta):
            if ema:
                raise ValueError(f"{workdir} holds converted weights, which have no EMA: leave "
                                 "out --ema")
            model, variables, meta = convert.load_converted(workdir)
            model = model.clone(dtype=train_lib.model_dtype(config.dtype))
        else:
            model = train_lib.build_model(config, num_classes)
    finally:
        checkpointer.close()
    if not convert.is_converted(meta):
        variables, _, _ = ckpt_lib.load_variables(workdir, step, ema=ema)
    mean, std, ratio = _dataset_preprocessing(meta.get("dataset", ""))
    return Loaded(model, variables, meta, config, step, class_names(meta, num_classes),
                  int(meta.get("image_size", config.image_size)),
                  tuple(meta.get("mean", mean)), tuple(meta.get("std", std)),
                  float(meta.get("eval_crop_ratio", ratio)))


def init_from(directory: str, variables: Mapping[str, Any], arch: Optional[str] = None
              ) -> Tuple[Dict[str, Any], List[str]]:
    """``variables`` filled from ``directory``'s latest checkpoint (a training workdir or a
    ``cnn_jax.convert`` output) for fine-tuning: the classifier is re-initialized when the class
    count differs; ``(variables, reinitialized_paths)`` as :func:`convert.init_from_converted`."""
    from cnn_jax import convert

    loaded = load(directory)
    if arch is not None and arch != loaded.meta["arch"]:
        raise ValueError(f"{directory} holds {loaded.meta['arch']!r} weights, not {arch!r}")
    pretrained = {"params": loaded.variables["params"],
                  **({"batch_stats": loaded.variables["batch_stats"]}
                     if "batch_stats" in loaded.variables else {})}
    return convert.fit_pretrained(pretrained, variables, loaded.meta["arch"], directory)


def top_k(probs: np.ndarray, k: int) -> List[Tuple[int, float]]:
    """``k`` (class index, probability) pairs of one probability vector, most probable first."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]

