"""The training loop: ``train_and_evaluate(config, workdir)``.

Data-parallel SGD over every device (:mod:`cnn_jax.parallel`), periodic evaluation, Orbax
checkpoints that make a re-run resume exactly where the last one stopped (same step, optimizer
state, rngs and data position), SIGTERM handling and a NaN guard. Options: an EMA of the weights
(``ema_decay``), gradient accumulation (``grad_accum_steps``), float16 with dynamic loss scaling
(``dtype=float16``), mixup/CutMix (``mixup_alpha``/``cutmix_alpha``) and a profiler trace
(``profile_steps``).

Steps are optimizer updates: with ``grad_accum_steps`` = k each takes k micro-batches of
``batch_size / k`` (the TrainState's ``step`` counts micro-batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging

from cnn_jax import augment
from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import configs as configs_lib
from cnn_jax import input_pipeline
from cnn_jax import metrics as metrics_lib
from cnn_jax import optim
from cnn_jax import parallel
from cnn_jax import train_step as step_lib
from cnn_jax.models import check_model_options, count_params, create_model
from cnn_jax.validation import DTYPES


class NonFiniteLossError(ValueError):
    """The training loss (or gradient norm) became NaN or infinite."""


def model_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return jnp.dtype(name)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The registered ``config.arch`` with ``num_classes`` outputs and the compute dtype."""
    if not config.arch:
        raise ValueError("no architecture given: pass --arch=<name> (e.g. --arch=resnet18)")
    options = check_model_options(config.arch, configs_lib.model_options(config))
    return create_model(config.arch, num_classes=num_classes, dtype=model_dtype(config.dtype),
                        **options)


class Setup(NamedTuple):
    model: Any
    host_state: step_lib.TrainState  # freshly initialized, host (numpy) arrays
    schedule: Callable[[Any], Any]
    steps_per_epoch: int  # optimizer updates
    total_steps: int  # optimizer updates
    grad_accum_steps: int = 1  # micro-batches per update


def grad_accum_steps(config: ml_collections.ConfigDict, num_devices: int = 1) -> int:
    """``config.grad_accum_steps``, checked against the batch and device count."""
    k = int(config.get("grad_accum_steps", 1) or 1)
    if k < 1:
        raise ValueError(f"--config.grad_accum_steps must be >= 1, got {k}")
    if config.batch_size % (k * num_devices):
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by grad_accum_steps x devices "
            f"({k} x {num_devices}); each update takes {k} micro-batches of batch_size / {k}, "
            "split over the devices")
    return k


def create_setup(config: ml_collections.ConfigDict, info: Any) -> Setup:
    """Model, initial state (fp32 params, optimizer state, EMA, loss scale) and schedule."""
    model = build_model(config, info.num_classes)
    k = grad_accum_steps(config)
    steps_per_epoch = optim.steps_per_epoch(info.num_train_examples, config.batch_size)
    total_steps = optim.total_train_steps(config, info.num_train_examples, config.batch_size)
    tx, schedule = optim.from_config(config, steps_per_epoch, total_steps, config.batch_size)
    image_shape = (config.image_size, config.image_size, 3)
    state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(config.seed), image_shape,
                                        model_dtype(config.dtype))
    if float(config.get("ema_decay", 0.0) or 0.0) > 0:
        state = step_lib.init_ema(state)
    if config.dtype == "float16":
        state = state.replace(dynamic_scale=step_lib.new_dynamic_scale())
    return Setup(model, jax.tree_util.tree_map(np.asarray, state), schedule, steps_per_epoch,
                 total_steps, k)


def parse_profile_steps(text: str) -> Optional[Tuple[int, int]]:
    """``"START:END"`` -> (START, END): trace the steps after step START up to step END."""
    if not text:
        return None
    try:
        start, end = (int(v) for v in str(text).split(":"))
    except ValueError:
        start, end = -1, -1
    if not 0 <= start < end:
        raise ValueError(f"--config.profile_steps must be START:END with 0 <= START < END "
                         f"(e.g. 10:15), got {text!r}")
    return start, end


def profile_compile_note(profile: Optional[Tuple[int, int]], start_step: int) -> Optional[str]:
    """A note when the profiler window opens at this run's first step (that step compiles the
    train step, so the trace holds the compilation too: tens of seconds to write, hard to read) or
    before it (a resumed run: nothing is traced)."""
    if not profile or profile[0] > start_step:
        return None
    start, end = profile
    if start < start_step:
        return (f"profiler: the window {start}:{end} opens before step {start_step}, where this "
                "run starts: nothing is traced")
    return (f"profiler: the window {start}:{end} opens at this run's first step and traces its "
            f"compilation too (a large, slow trace); --config.profile_steps={start + 1}:{end + 1} "
            "starts after it")


def checkpoint_meta(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
    """What a checkpoint records about its run (checked on resume, used by evaluate)."""
    return {"arch": config.arch, "dataset": config.dataset, "num_classes": int(num_classes),
            "image_size": int(config.image_size), "config": config.to_dict()}


class _StopSignal:
    """Turns SIGTERM (preemption) into a flag the loop polls, so it can save and exit cleanly."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _any_process(flag: bool) -> bool:
    """True if ``flag`` is set on any process (every process must reach this call)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def verbose() -> bool:
    """True when ``--verbosity`` asked for INFO lines (the CLIs default to warnings only)."""
    return absl_logging.get_verbosity() >= absl_logging.INFO


def _prepare_shapes(config: ml_collections.ConfigDict) -> None:
    """Generate the built-in ``shapes`` on first use (process 0; the others wait for it)."""
    if config.dataset.partition("/")[0] != "shapes":
        return
    if jax.process_index() == 0:
        quiet = not verbose()
        builder = input_pipeline.sources.make_builder(config.dataset, config.data_dir or None,
                                                      config.image_size)
        if quiet and not builder.is_prepared():
            print(f"generating the {config.dataset} dataset in {builder.data_dir} "
                  "(once; nothing is downloaded)", file=sys.stderr, flush=True)
        # TFDS prints "Downloading and preparing dataset Unknown size" for generated data.
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            input_pipeline.prepare_dataset(config.dataset, config.data_dir or None,
                                           image_size=config.image_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("shapes prepared")


# Evaluation splits up to this size (decoded, in the compute dtype) are kept on the devices after
# the first evaluation of a run: building the tf.data pipeline again costs about as much as
# evaluating 1,000 small images on a 2-core CPU.
EVAL_CACHE_BYTES = 256 * 2 ** 20


def eval_cache_for(config: ml_collections.ConfigDict, num_eval_examples: int) -> Optional[list]:
    """An empty list to pass to :func:`evaluate` if the eval split is small enough to keep."""
    size = num_eval_examples * config.image_size ** 2 * 3 * model_dtype(config.dtype).itemsize
    return [] if size <= EVAL_CACHE_BYTES else None


def evaluate(p_eval_step, state, dp: parallel.DataParallel, config: ml_collections.ConfigDict,
             views_fn: Optional[Callable] = None, cache: Optional[list] = None
             ) -> Dict[str, float]:
    """Top-1/top-5/loss over the whole eval split (each example once: padded batches are masked).

    ``views_fn``: the test-time views of each image (cnn_jax.protocols), default its centre crop.
    ``cache``: a list that keeps the placed batches of the first call (evaluation is
    deterministic) for the next ones (:func:`eval_cache_for`); None reads the split every time.
    """
    if cache:
        batches = iter(cache)
    else:
        eval_batch = config.eval_batch_size or config.batch_size
        parallel.check_batch_size(eval_batch, dp.num_devices)
        extra = {} if views_fn is None else {"views_fn": views_fn}
        it = input_pipeline.create_eval_iterator(
            config.dataset, config.data_dir or None, eval_batch, config.image_size,
            dtype=config.dtype, num_local_devices=dp.num_local_devices,
            process_index=jax.process_index(), process_count=jax.process_count(),
            threads=input_pipeline.threads_beside(jax.default_backend()), **extra)
        batches = dp.prefetch(it, config.prefetch)
        if cache is not None:
            batches = _keeping(batches, cache)
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in batches:
        sums = dp.unreplicate(p_eval_step(state, batch))
        for k in totals:
            totals[k] += float(sums[k])
    return step_lib.summarize_eval(totals)


def _keeping(batches, cache: list):
    """Yields ``batches``, appending each to ``cache`` (only a complete pass is kept)."""
    kept = []
    for batch in batches:
        kept.append(batch)
        yield batch
    cache.extend(kept)


def _mean_metrics(dp: parallel.DataParallel, pending: list) -> Dict[str, float]:
    """Means over the pending micro-steps; float16 steps skipped by the loss scaler are left out
    of the means and counted in ``skipped_steps``."""
    host = [dp.unreplicate(m) for m in pending]
    skipped = [bool(m.get("skipped", 0)) for m in host]
    kept = [m for m, s in zip(host, skipped) if not s] or host
    out = {k: float(np.mean([m[k] for m in kept])) for k in host[0] if k != "skipped"}
    if "skipped" in host[0]:
        out["skipped_steps"] = float(sum(skipped))
        out["loss_scale"] = float(host[-1]["loss_scale"])
    return out


def _check_finite(dp: parallel.DataParallel, pending: list, first_micro_step: int,
                  accum: int = 1) -> None:
    for i, m in enumerate(pending):
        keys = [k for k in ("loss", "grad_norm", "skipped", "loss_scale") if k in m]
        values = dp.unreplicate({k: m[k] for k in keys})
        if all(np.isfinite(values[k]) for k in ("loss", "grad_norm")):
            continue
        # An overflow the float16 scaler skipped is no divergence, unless the scale is at its
        # minimum (1) and the step still overflows.
        if values.get("skipped") and values.get("loss_scale", 0.0) > 1.0:
            continue
        step = (first_micro_step + i + accum - 1) // accum
        raise NonFiniteLossError(
            f"training diverged at step {step} (loss {values['loss']:.4g}, "
            f"gradient norm {values['grad_norm']:.4g}); stopped, the last good checkpoint "
            "is kept: lower --config.learning_rate or set --config.grad_clip_norm")


def _best_so_far(workdir: str, up_to_step: int, split: str = "eval"
                 ) -> Optional[Dict[str, Any]]:
    """The best val top-1 logged before a resume (from metrics.jsonl), for the final summary."""
    records = [r for r in metrics_lib.read_metrics(workdir, split) if r["step"] <= up_to_step]
    if not records:
        return None
    top = max(records, key=lambda r: r["top1"])
    return {"top1": top["top1"], "step": top["step"]}


def _ema_view(state: step_lib.TrainState) -> step_lib.TrainState:
    return state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)


@dataclasses.dataclass
class EvalEvent:
    """What a hook of :func:`train_and_evaluate` sees: at step 0 of a fresh run (before any update,
    ``metrics`` None) and after every evaluation. ``write(split, scalars)`` adds a record to
    ``metrics.jsonl`` at this step (kept consistent on resume like the loop's own); setting
    ``stop`` saves a checkpoint and ends the run (e.g. a plateau criterion)."""

    step: int
    total_steps: int
    steps_per_epoch: int
    state: step_lib.TrainState  # one device's copy
    metrics: Optional[Dict[str, float]]
    write: Callable[[str, Dict[str, float]], None]
    stop: bool = False
    # the training metrics logged at this step (means since the last log), None at step 0
    train_metrics: Optional[Dict[str, float]] = None


Hook = Callable[[EvalEvent], None]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Hook] = ()) -> Dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset``, checkpointing into ``workdir``.

    Returns the last evaluation metrics (``ema_top1`` etc. too with an EMA) plus ``step`` and
    ``stopped`` (True when it stopped early on SIGTERM, ``max_steps_per_run`` or a hook;
    re-running the same command resumes). ``hooks`` are called with an :class:`EvalEvent`
    (periodic actions, e.g. per-layer gradient norms in experiments/activations.py).
    """
    t_start = time.time()
    configs_lib.validate(config, workdir)  # every field, before anything is written
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = config.copy_and_resolve_references()
    config.dataset = input_pipeline.canonical_name(config.dataset)  # folder:DIR -> absolute DIR
    is_main = jax.process_index() == 0
    dp = parallel.DataParallel(config.parallel)
    parallel.check_batch_size(config.batch_size, dp.num_devices)
    accum = grad_accum_steps(config, dp.num_devices)
    micro_batch = config.batch_size // accum
    ema_decay = float(config.get("ema_decay", 0.0) or 0.0)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"--config.ema_decay must be in [0, 1) (0 = no EMA), got {ema_decay}")
    best_metric = config.get("best_metric", "top1") or "top1"
    if best_metric == "ema_top1" and not ema_decay:
        raise ValueError("--config.best_metric=ema_top1 needs an EMA: set --config.ema_decay "
                         "(e.g. 0.9999)")
    mixup_alpha = float(config.get("mixup_alpha", 0.0) or 0.0)
    cutmix_alpha = float(config.get("cutmix_alpha", 0.0) or 0.0)
    augment.check_mix_options(mixup_alpha, cutmix_alpha)
    profile = parse_profile_steps(config.get("profile_steps", ""))
    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir or None,
                                           image_size=config.image_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                         async_save=config.async_checkpointing,
                                         best_metric=best_metric)
    meta = {**checkpoint_meta(config, info.num_classes), **info.checkpoint_meta()}
    ckpt_lib.check_workdir(checkpointer, meta)  # before the model's init compiles

    _prepare_shapes(config)
    setup = create_setup(config, info)
    steps_per_epoch, total_steps = setup.steps_per_epoch, setup.total_steps
    eval_every = config.eval_every_steps or steps_per_epoch
    ckpt_every = config.checkpoint_every_steps or eval_every

    notices: list = []
    host_state, restored_step = ckpt_lib.restore_for_training(
        checkpointer, setup.host_state, meta, notices.append)
    if host_state is None:
        host_state = setup.host_state
        if config.init_from:  # fine-tune a workdir's or imported weights; a new head if needed
            from cnn_jax import loading

            variables, _ = loading.init_from(
                config.init_from,
                {"params": host_state.params, "batch_stats": host_state.batch_stats},
                arch=config.arch)
            host_state = host_state.replace(params=variables["params"],
                                            batch_stats=variables.get("batch_stats", {}))
            if ema_decay:
                host_state = step_lib.init_ema(host_state)
    else:
        saved_accum = int((checkpointer.read_meta(restored_step) or {}).get("config", {}).get(
            "grad_accum_steps", 1) or 1)
        if saved_accum != accum:  # the state's step counts micro-batches of the saved run
            host_state = host_state.replace(
                step=np.asarray(int(host_state.step) // saved_accum * accum,
                                np.asarray(host_state.step).dtype))
    start_micro = int(host_state.step)
    start_step = start_micro // accum

    if is_main and start_step:
        metrics_lib.discard_after(workdir, start_step)  # the killed run's steps come again
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    if start_step == 0:
        writer.write_hparams(config.to_dict())
    bn_axis = dp.axis_name if config.cross_device_bn else None
    p_train_step = dp.map(functools.partial(
        step_lib.train_step, axis_name=dp.axis_name, bn_axis_name=bn_axis,
        label_smoothing=config.label_smoothing, aux_loss_weight=config.aux_loss_weight,
        learning_rate_fn=setup.schedule, ema_decay=ema_decay,
        ema_warmup=bool(config.get("ema_warmup", True)), mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha, grad_accum_steps=accum), donate_argnums=(0,))
    p_eval_step = dp.map(functools.partial(step_lib.eval_step, axis_name=dp.axis_name))
    # The EMA is evaluated by the same compiled step, on a view of the state with the EMA
    # variables in place of the raw ones.
    p_eval_ema = (lambda st, b: p_eval_step(_ema_view(st), b)) if ema_decay else None
    p_sync = dp.map(functools.partial(step_lib.sync_batch_stats, axis_name=dp.axis_name),
                    donate_argnums=(0,))
    state = dp.replicate(host_state)
    del host_state
    eval_cache = eval_cache_for(config, info.num_eval_examples)

    def call_hooks(step: int, metrics: Optional[Dict[str, float]],
                   train_metrics: Optional[Dict[str, float]] = None) -> bool:
        """Run the hooks; True if one asked to stop (on any process)."""
        if not hooks:
            return False
        event = EvalEvent(step, total_steps, steps_per_epoch, dp.unreplicate(state), metrics,
                          lambda split, scalars: writer.write(step, split, scalars),
                          train_metrics=train_metrics)
        for hook in hooks:
            hook(event)
        return _any_process(event.stop)

    if start_step == 0:
        call_hooks(0, None)

    # The micro-batch stream: example positions do not depend on grad_accum_steps.
    train_iter = dp.prefetch(input_pipeline.create_train_iterator(
        config.dataset, config.data_dir or None, micro_batch, config.image_size,
        seed=config.seed, start_step=start_micro, dtype=config.dtype,
        augment=config.augment or None, num_local_devices=dp.num_local_devices,
        process_index=jax.process_index(), process_count=jax.process_count(),
        threads=input_pipeline.threads_beside(jax.default_backend())), config.prefetch)

    stop_at = total_steps
    if config.max_steps_per_run > 0:
        stop_at = min(total_steps, start_step + config.max_steps_per_run)
    if is_main:
        extras = [x for x in (f"EMA {ema_decay:g}" if ema_decay else "",
                              f"{accum} micro-batches per step" if accum > 1 else "",
                              config.dtype if config.dtype != "float32" else "") if x]
        print(f"training {config.arch} ({count_params(setup.host_state.params):,} parameters) on "
              f"{config.dataset} ({info.num_train_examples:,} train / "
              f"{info.num_eval_examples:,} val images) for {total_steps} steps of "
              f"{config.batch_size}{' (' + ', '.join(extras) + ')' if extras else ''}; workdir "
              f"{workdir}", file=sys.stderr, flush=True)
        for line in notices:
            print(line, file=sys.stderr, flush=True)
    bar = metrics_lib.ProgressBar(total_steps, start_step, enabled=is_main and config.progress_bar)
    if start_step:
        bar.write(f"resuming {config.arch} from step {start_step} in {checkpointer.directory}")
    note = profile_compile_note(profile, start_step) if is_main else None
    if note:
        bar.write(note)

    eval_metrics: Optional[Dict[str, float]] = None
    ema_metrics: Optional[Dict[str, float]] = None
    best_split = "eval_ema" if best_metric == "ema_top1" else "eval"
    best = _best_so_far(workdir, start_step, best_split) if is_main else None
    step, micro, stopped, hook_stop = start_step, start_micro, False, False
    pending: list = []
    interval_start, interval_steps = time.time(), 0
    profiling = False
    try:
        with _StopSignal() as stop_signal:
            while step < stop_at:
                if profile and step == profile[0] and not profiling and micro % accum == 0:
                    jax.profiler.start_trace(workdir, create_perfetto_trace=True)
                    profiling = True
                batch = next(train_iter)
                state, step_metrics = p_train_step(state, batch)
                pending.append(step_metrics)
                micro += 1
                if micro % accum:
                    continue
                step += 1
                interval_steps += 1
                bar.update(1)
                if profiling and step == profile[1]:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
                    bar.write(f"profiler: steps {profile[0] + 1}-{profile[1]} traced into "
                              f"{os.path.join(workdir, 'plugins', 'profile')}")

                done = step == stop_at
                do_eval = step % eval_every == 0 or step == total_steps
                do_save = do_eval or step % ckpt_every == 0 or done
                log_now = step % config.log_every_steps == 0 or do_save
                if log_now:
                    stopped = _any_process(stop_signal.received) and not done
                    do_save = do_save or stopped
                if not (log_now or do_save):
                    continue

                # Fetching metrics syncs with the devices; only ever here, and before any save,
                # so that no checkpoint holds parameters past a non-finite step.
                _check_finite(dp, pending, micro - len(pending) + 1, accum)
                train_metrics = _mean_metrics(dp, pending)
                seconds = time.time() - interval_start
                train_metrics["images_per_sec"] = interval_steps * config.batch_size / seconds
                train_metrics["epoch"] = step / steps_per_epoch
                writer.write(step, "train", train_metrics)
                bar.set_metrics(train_metrics["loss"], train_metrics["accuracy"],
                                train_metrics["images_per_sec"])
                pending = []

                if do_eval or do_save:
                    state = p_sync(state)  # identical BN statistics on every device
                if do_eval:
                    eval_metrics = evaluate(p_eval_step, state, dp, config, cache=eval_cache)
                    writer.write(step, "eval", eval_metrics)
                    line = (f"step {step}: val top-1 {100 * eval_metrics['top1']:.2f}% "
                            f"top-5 {100 * eval_metrics['top5']:.2f}% "
                            f"loss {eval_metrics['loss']:.4f}")
                    if p_eval_ema is not None:
                        ema_metrics = evaluate(p_eval_ema, state, dp, config, cache=eval_cache)
                        writer.write(step, "eval_ema", ema_metrics)
                        line += (f"; EMA top-1 {100 * ema_metrics['top1']:.2f}% "
                                 f"top-5 {100 * ema_metrics['top5']:.2f}%")
                    bar.write(line)
                    current = ema_metrics if best_split == "eval_ema" else eval_metrics
                    if best is None or current["top1"] > best["top1"]:
                        best = {"top1": current["top1"], "step": step}
                    hook_stop = call_hooks(step, eval_metrics, train_metrics) and not done
                    do_save = do_save or hook_stop
                if do_save:
                    saved_metrics = None
                    if do_eval:
                        saved_metrics = {"top1": eval_metrics["top1"]}
                        if ema_metrics is not None:
                            saved_metrics["ema_top1"] = ema_metrics["top1"]
                    checkpointer.save(step, dp.unreplicate(state), meta, metrics=saved_metrics)
                interval_start, interval_steps = time.time(), 0
                if stopped:
                    bar.write(f"SIGTERM: saved a checkpoint at step {step}; re-run the same "
                              "command to resume")
                    break
                if hook_stop:
                    bar.write(f"stopped by a hook at step {step} of {total_steps}")
                    break
    finally:
        if profiling:
            jax.profiler.stop_trace()
        bar.close()
        checkpointer.close()
        writer.close()
        # Closed here, not left to the garbage collector: the dropped tf.data iterator otherwise
        # took seconds to tear down (~0.3 s per epoch of a 125-step epoch run: 37 s of a 25-epoch
        # experiment run), while closing it takes milliseconds.
        train_iter.close()

    if step < total_steps and not (stopped or hook_stop) and is_main:
        print(f"stopped at step {step} of {total_steps} (max_steps_per_run); re-run the same "
              "command to continue", flush=True)
    stopped = stopped or step < total_steps
    if eval_metrics is None and not stopped:  # re-run of a finished job: report its model
        eval_metrics = evaluate(p_eval_step, state, dp, config)
        if p_eval_ema is not None:
            ema_metrics = evaluate(p_eval_ema, state, dp, config)
    result: Dict[str, Any] = dict(eval_metrics or {})
    if ema_metrics:
        result.update({f"ema_{k}": v for k, v in ema_metrics.items()})
    # sigterm: a SIGTERM came while the loop ran, even one too late to stop it (a caller that runs
    # several trainings, as experiments/run.py, stops there instead of starting the next).
    result.update(step=step, stopped=stopped, total_steps=total_steps, stopped_by_hook=hook_stop,
                  sigterm=stop_signal.received)
    if is_main and (hook_stop or not stopped):
        print(metrics_lib.summary_line(config.arch, config.dataset, step, time.time() - t_start,
                                       eval_metrics, best, workdir, ema_metrics), flush=True)
    return result
