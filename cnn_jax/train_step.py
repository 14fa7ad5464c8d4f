"""The per-device train and eval steps, as pure functions of ``(state, batch)``.

Written once for one device; :mod:`cnn_jax.parallel` runs the same functions under ``jax.pmap``
or ``jax.shard_map`` with ``axis_name`` bound, and ``jax.jit`` runs them with ``axis_name=None``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state

from cnn_jax.models.layers import split_logits

Array = jax.Array
Batch = Dict[str, Array]
Metrics = Dict[str, Array]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BN running statistics, the base key of the dropout rngs, and the
    optional EMA of the weights and float16 loss scale."""

    batch_stats: Any = None
    rng: Any = None  # raw uint32 key data (checkpointable); per-step keys are folded from it
    ema_params: Any = None  # exponential moving average of params (None: EMA off)
    ema_batch_stats: Any = None  # ... and of the BN statistics
    dynamic_scale: Any = None  # flax DynamicScale (float16 only)


def init_ema(state: TrainState) -> TrainState:
    """Start the EMA at the current weights (and BN statistics)."""
    copy = lambda t: jax.tree_util.tree_map(lambda x: x.copy() if hasattr(x, "copy") else x, t)  # noqa: E731
    return state.replace(ema_params=copy(state.params), ema_batch_stats=copy(state.batch_stats))


def new_dynamic_scale() -> dynamic_scale_lib.DynamicScale:
    """Dynamic loss scaling for float16 (Micikevicius et al. 2018, "Mixed Precision Training"):
    start at 2^15, halve on an overflow (that step is skipped), double after 2000 finite steps;
    never below 1, where a still-overflowing step means the run diverged."""
    return dynamic_scale_lib.DynamicScale(growth_interval=2000, scale=2.0 ** 15,
                                          minimum_scale=1.0)


def ema_decay_at(decay: float, updates: Array, warmup: bool) -> Array:
    """The EMA decay after ``updates`` optimizer updates; with ``warmup`` the TF
    ExponentialMovingAverage ramp ``min(decay, (1 + n) / (10 + n))``, so short runs average too."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    n = updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def _jitted_init(model: nn.Module) -> Callable:
    """``model.init`` jitted once per distinct model: modules are equal and hash by their
    fields, so a new instance of the same network (each seed of an analysis) compiles nothing."""
    try:
        return _jitted_init_cached(model)
    except TypeError:  # a field that cannot be hashed (a list): no cache
        return _jitted_init_cached.__wrapped__(model)


@functools.lru_cache(maxsize=32)
def _jitted_init_cached(model: nn.Module) -> Callable:
    return jax.jit(functools.partial(model.init, train=True))


def init_variables(model: nn.Module, rng: Array, image_shape: Tuple[int, int, int],
                   dtype: Any = jnp.float32) -> Dict[str, Any]:
    """``model.init`` on a one-image batch, jitted (eager init of a deep net is slow).

    ``train=True`` so that train-only branches (GoogLeNet's auxiliary heads) get parameters too.
    """
    params_rng, dropout_rng = jax.random.split(rng)
    dummy = jnp.zeros((1,) + tuple(image_shape), dtype)
    init = _jitted_init(model)
    # The partitionable threefry (JAX's default) makes XLA:CPU compile init 2x slower (resnet18:
    # 10 s vs 4.7 s); a one-image init never runs sharded, so the classic bit stream is used.
    with jax.threefry_partitionable(False):
        return dict(init({"params": params_rng, "dropout": dropout_rng}, dummy))


# Parameters of at least this many elements are updated only after everything else in the step
# has read them (``after``), so that XLA writes their update in place instead of copying them.
IN_PLACE_MIN_SIZE = 1 << 20


def after(tree: Any, value: Array, min_size: int = 0) -> Any:
    """``tree`` unchanged, but its leaves of at least ``min_size`` elements computed from
    ``value`` (adds ``0 * value``, exactly 0 for a finite ``value``): whatever uses them runs
    after ``value`` is known.

    The train step updates the parameters from ``after(params, grad_norm + metrics,
    IN_PLACE_MIN_SIZE)``. The loops donate the state, so each new parameter is written into its
    old buffer, and XLA must be sure that every read of the old value comes first. Nothing
    ordered a layer's update after the other reads of its weights (a layer's input gradient,
    batch-norm parameters in activations recomputed for other layers' gradients, the classifier's
    bias in the logits recomputed for the loss and accuracy), so XLA copied such parameters at
    the start of every step: 10 of alexnet's 16 tensors (its fully connected kernels, fc8's bias
    and six conv tensors, 244 MB), 114 of resnet50's 161. The global norm reads every gradient,
    so updates that depend on it and on the metrics come after all of those reads, and the copies
    go (``jax.lax.optimization_barrier`` did not do it: XLA:CPU expands it before inserting
    copies).
    Only large tensors: ordered, alexnet's train step went 453 -> 426 ms and resnet50's 2,847 ->
    2,755 ms (batch 16 at 224 px, one process, rounds in alternating order, medians of 11 and 9,
    2-core AVX-512 host, 2026-12-05), but with every tensor ordered resnet50's was 5-9% slower
    (two runs), the update of ~300 small tensors waiting for the whole backward pass. A NaN or
    infinite ``value`` makes those parameters NaN, as such gradients or logits would."""
    zero = 0.0 * value
    return jax.tree_util.tree_map(
        lambda x: x + zero.astype(x.dtype) if x.size >= min_size else x, tree)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: Array,
                       image_shape: Tuple[int, int, int], dtype: Any = jnp.float32) -> TrainState:
    """A fresh state: fp32 parameters and optimizer state whatever the model's compute dtype."""
    init_rng, dropout_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng, image_shape, dtype)
    if jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):  # typed key -> raw uint32 data
        dropout_rng = jax.random.key_data(dropout_rng)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=dropout_rng)


@contextlib.contextmanager
def batch_norm_axis(axis_name: Optional[str]) -> Iterator[None]:
    """Make every ``nn.BatchNorm`` called inside reduce its statistics over ``axis_name``.

    Cross-device ("synchronized") BN: mean and variance over the global batch (Ioffe & Szegedy
    2015 normalize over the mini-batch; with data parallelism that batch spans devices). The
    models do not expose BN's ``axis_name`` as a field, so an interceptor sets it on each BN
    instance for the duration of its call only.
    """
    if axis_name is None:
        yield
        return

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__" \
                or module.axis_name is not None:
            return next_fun(*args, **kwargs)
        object.__setattr__(module, "axis_name", axis_name)  # linen modules are frozen
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "axis_name", None)

    with nn.intercept_methods(interceptor):
        yield


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0,
                  partner_labels: Optional[Array] = None, lam: Optional[Array] = None) -> Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing.

    Label smoothing: Szegedy et al. 2016 (Inception v3), Sec. 7. With ``partner_labels`` and
    ``lam`` (mixup/CutMix) the target is ``lam * y + (1 - lam) * y_partner``, then smoothed.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if partner_labels is not None:
        targets = lam * targets + (1.0 - lam) * jax.nn.one_hot(
            partner_labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _device_index(axis_name: Optional[str]) -> Array:
    return jax.lax.axis_index(axis_name) if axis_name is not None else jnp.int32(0)


def step_rng(state: TrainState, axis_name: Optional[str]) -> Array:
    """The dropout key of this step and device: fold_in(fold_in(base, step), device)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.random.fold_in(key, _device_index(axis_name))


def global_norm(tree: Any) -> Array:
    """The L2 norm of all leaves together (``optax.tree.norm`` of a real-valued tree) in lax
    primitives: each jnp op is a jitted function that traces anew for every new leaf shape, five
    per leaf in ``optax.tree.norm`` (densenet121's 364 gradients: 1.2 s of tracing against 0.2)."""
    squares = []
    for x in map(jnp.asarray, jax.tree_util.tree_leaves(tree)):
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        squares.append(jax.lax.reduce(jax.lax.square(x.astype(dtype)), jnp.zeros((), dtype),
                                      jax.lax.add, tuple(range(x.ndim))))
    if not squares:
        return jnp.zeros((), jnp.float32)
    return jax.lax.sqrt(functools.reduce(jax.lax.add, squares))


def train_step(state: TrainState, batch: Batch, *, axis_name: Optional[str] = None,
               bn_axis_name: Optional[str] = None, label_smoothing: float = 0.0,
               aux_loss_weight: float = 0.3,
               learning_rate_fn: Optional[Callable[[Array], Array]] = None,
               ema_decay: float = 0.0, ema_warmup: bool = True, mixup_alpha: float = 0.0,
               cutmix_alpha: float = 0.0, grad_accum_steps: int = 1
               ) -> Tuple[TrainState, Metrics]:
    """One SGD step on this device's ``batch`` (``image`` [b, H, W, C], ``label`` [b]).

    Gradients and metrics are averaged over ``axis_name``; ``bn_axis_name`` (normally the same
    axis, or None) turns on cross-device BN. Auxiliary classifiers (GoogLeNet) add
    ``aux_loss_weight`` times their loss (Szegedy et al. 2015, Sec. 5: weight 0.3).

    ``mixup_alpha``/``cutmix_alpha`` mix this device's batch with itself rolled by one (keys
    folded from the step's key, so resuming is exact). With ``state.dynamic_scale`` (float16) the
    loss is scaled and a step whose gradients overflow is skipped: parameters, optimizer state, BN
    statistics and EMA stay as they were, only ``step`` advances and the scale halves
    (``skipped`` = 1). ``ema_decay`` > 0 updates the EMA of the parameters and BN statistics after
    every optimizer update (every ``grad_accum_steps`` steps with ``optax.MultiSteps``).
    """
    dropout_rng = step_rng(state, axis_name)
    images, labels = batch["image"], batch["label"]
    mixed = None
    if mixup_alpha > 0 or cutmix_alpha > 0:
        # Imported here: cnn_jax.augment's tf.data ops need TensorFlow, which the train step
        # itself does not (the GPU benchmark runs it without TensorFlow installed).
        from cnn_jax import augment

        mixed = augment.mix_batch(jax.random.fold_in(dropout_rng, 1 << 20), images, labels,
                                  mixup_alpha, cutmix_alpha)
    partner, lam = None, None
    if mixed is not None:
        images, labels, partner, lam = mixed

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        with batch_norm_axis(bn_axis_name):
            outputs, new_vars = state.apply_fn(variables, images, train=True,
                                               mutable=["batch_stats"],
                                               rngs={"dropout": dropout_rng})
        logits, aux_logits = split_logits(outputs)
        ce = jnp.mean(cross_entropy(logits, labels, label_smoothing, partner, lam))
        loss = ce
        for aux in aux_logits:
            loss = loss + aux_loss_weight * jnp.mean(
                cross_entropy(aux, labels, label_smoothing, partner, lam))
        return loss, (new_vars.get("batch_stats", {}), logits, ce)

    scale = state.dynamic_scale
    if scale is None:
        (loss, (batch_stats, logits, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        finite = None
    else:  # the scaler pmean-s the (unscaled, float32) gradients itself
        new_scale, finite, (loss, (batch_stats, logits, ce)), grads = scale.value_and_grad(
            loss_fn, has_aux=True, axis_name=axis_name)(state.params)
    grad_norm = global_norm(grads)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    # The update of large parameters after every read of their old values (``after``): the
    # backward pass (all of it goes into the norm) and the metrics (XLA recomputes the logits).
    params = after(state.params, grad_norm + accuracy + loss + ce, IN_PLACE_MIN_SIZE)
    new_state = state.replace(params=params).apply_gradients(grads=grads,
                                                             batch_stats=batch_stats)

    if ema_decay > 0 and state.ema_params is not None:
        updated = jnp.asarray(True)
        updates = new_state.step
        if isinstance(new_state.opt_state, optax.MultiStepsState):
            updated = new_state.opt_state.mini_step == 0
            updates = new_state.opt_state.gradient_step
        decay = ema_decay_at(ema_decay, updates, ema_warmup)
        ema = lambda old, new: jnp.where(updated, decay * old + (1.0 - decay) * new, old)  # noqa: E731
        new_state = new_state.replace(
            ema_params=jax.tree_util.tree_map(ema, state.ema_params, new_state.params),
            ema_batch_stats=jax.tree_util.tree_map(ema, state.ema_batch_stats,
                                                   new_state.batch_stats))
    if finite is not None:
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        fields = ("params", "opt_state", "batch_stats", "ema_params", "ema_batch_stats")
        new_state = new_state.replace(
            **{f: jax.tree_util.tree_map(keep, getattr(new_state, f), getattr(state, f))
               for f in fields},
            dynamic_scale=new_scale)

    metrics = {
        "loss": loss,
        "cross_entropy": ce,
        "accuracy": accuracy,
        "grad_norm": grad_norm,
    }
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    if finite is not None:
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        metrics["loss_scale"] = scale.scale.astype(jnp.float32)
    if learning_rate_fn is not None:
        metrics["learning_rate"] = jnp.asarray(
            learning_rate_fn(state.step // grad_accum_steps), jnp.float32)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, axis_name: Optional[str] = None,
              use_ema: bool = False) -> Metrics:
    """Sums over this device's masked ``batch``: loss, top-1 and top-5 hits and the count.

    Sums (not means) so that padded final batches and uneven devices add up exactly; psum-ed over
    ``axis_name``. ``use_ema`` evaluates the EMA weights and BN statistics instead.
    """
    if use_ema:
        variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
    else:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, batch["image"], train=False)
    logits, _ = split_logits(logits)
    logits = logits.astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask")
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top_k = jax.lax.top_k(logits, k)
    sums = {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "top1": jnp.sum((top_k[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def sync_batch_stats(state: TrainState, *, axis_name: str) -> TrainState:
    """Average the per-device BN running statistics, so that every device holds the same model."""
    state = state.replace(batch_stats=jax.lax.pmean(state.batch_stats, axis_name))
    if state.ema_batch_stats is not None:
        state = state.replace(ema_batch_stats=jax.lax.pmean(state.ema_batch_stats, axis_name))
    return state


def summarize_eval(sums: Dict[str, Any]) -> Dict[str, float]:
    """Turn the summed eval counters into ``loss``, ``top1`` and ``top5`` (fractions)."""
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / count, "top1": float(sums["top1"]) / count,
            "top5": float(sums["top5"]) / count, "count": int(round(float(sums["count"])))}
