"""The training loop: ``train_and_evaluate(config, workdir)``.

Data-parallel SGD over every device (:mod:`cnn_jax.parallel`), periodic evaluation, Orbax
checkpoints that make a re-run resume exactly where the last one stopped (same step, optimizer
state, rngs and data position), SIGTERM handling and a NaN guard.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import configs as configs_lib
from cnn_jax import input_pipeline
from cnn_jax import metrics as metrics_lib
from cnn_jax import optim
from cnn_jax import parallel
from cnn_jax import train_step as step_lib
from cnn_jax.models import check_model_options, create_model
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
    steps_per_epoch: int
    total_steps: int


def create_setup(config: ml_collections.ConfigDict, info: Any) -> Setup:
    """Model, initial state (fp32 params, optimizer state) and schedule for a dataset."""
    model = build_model(config, info.num_classes)
    steps_per_epoch = optim.steps_per_epoch(info.num_train_examples, config.batch_size)
    total_steps = optim.total_train_steps(config, info.num_train_examples, config.batch_size)
    tx, schedule = optim.from_config(config, steps_per_epoch, total_steps, config.batch_size)
    image_shape = (config.image_size, config.image_size, 3)
    state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(config.seed), image_shape,
                                        model_dtype(config.dtype))
    return Setup(model, jax.tree_util.tree_map(np.asarray, state), schedule, steps_per_epoch,
                 total_steps)


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


def _prepare_shapes(config: ml_collections.ConfigDict) -> None:
    """Generate the built-in ``shapes`` on first use (process 0; the others wait for it)."""
    if config.dataset.partition("/")[0] != "shapes":
        return
    if jax.process_index() == 0:
        input_pipeline.prepare_dataset(config.dataset, config.data_dir or None,
                                       image_size=config.image_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("shapes prepared")


def evaluate(p_eval_step, state, dp: parallel.DataParallel, config: ml_collections.ConfigDict
             ) -> Dict[str, float]:
    """Top-1/top-5/loss over the whole eval split (each example once: padded batches are masked)."""
    eval_batch = config.eval_batch_size or config.batch_size
    parallel.check_batch_size(eval_batch, dp.num_devices)
    it = input_pipeline.create_eval_iterator(
        config.dataset, config.data_dir or None, eval_batch, config.image_size,
        dtype=config.dtype, num_local_devices=dp.num_local_devices,
        process_index=jax.process_index(), process_count=jax.process_count())
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in dp.prefetch(it, config.prefetch):
        sums = dp.unreplicate(p_eval_step(state, batch))
        for k in totals:
            totals[k] += float(sums[k])
    return step_lib.summarize_eval(totals)


def _mean_metrics(dp: parallel.DataParallel, pending: list) -> Dict[str, float]:
    host = [dp.unreplicate(m) for m in pending]
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(dp: parallel.DataParallel, pending: list, first_step: int) -> None:
    for i, m in enumerate(pending):
        values = dp.unreplicate({"loss": m["loss"], "grad_norm": m["grad_norm"]})
        if not all(np.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(
                f"training diverged at step {first_step + i} (loss {values['loss']:.4g}, "
                f"gradient norm {values['grad_norm']:.4g}); stopped, the last good checkpoint "
                "is kept: lower --config.learning_rate or set --config.grad_clip_norm")


def _best_so_far(workdir: str, up_to_step: int) -> Optional[Dict[str, Any]]:
    """The best val top-1 logged before a resume (from metrics.jsonl), for the final summary."""
    records = [r for r in metrics_lib.read_metrics(workdir, "eval") if r["step"] <= up_to_step]
    if not records:
        return None
    top = max(records, key=lambda r: r["top1"])
    return {"top1": top["top1"], "step": top["step"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Train ``config.arch`` on ``config.dataset``, checkpointing into ``workdir``.

    Returns the last evaluation metrics plus ``step`` and ``stopped`` (True when it stopped
    early on SIGTERM or ``max_steps_per_run``; re-running the same command resumes).
    """
    t_start = time.time()
    configs_lib.validate(config, workdir)  # every field, before anything is written
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = config.copy_and_resolve_references()
    config.dataset = input_pipeline.canonical_name(config.dataset)  # folder:DIR -> absolute DIR
    is_main = jax.process_index() == 0
    dp = parallel.DataParallel(config.parallel)
    parallel.check_batch_size(config.batch_size, dp.num_devices)
    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir or None,
                                           image_size=config.image_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                         async_save=config.async_checkpointing)
    meta = {**checkpoint_meta(config, info.num_classes), **info.checkpoint_meta()}
    ckpt_lib.check_compatible(checkpointer.read_meta(), meta, checkpointer.directory)

    _prepare_shapes(config)
    setup = create_setup(config, info)
    steps_per_epoch, total_steps = setup.steps_per_epoch, setup.total_steps
    eval_every = config.eval_every_steps or steps_per_epoch
    ckpt_every = config.checkpoint_every_steps or eval_every

    host_state = setup.host_state
    if checkpointer.latest_step() is not None:
        host_state, _, _ = checkpointer.restore(host_state)
    elif config.init_from:  # fine-tune a workdir's or imported weights; a new head if needed
        from cnn_jax import loading

        variables, _ = loading.init_from(
            config.init_from, {"params": host_state.params, "batch_stats": host_state.batch_stats},
            arch=config.arch)
        host_state = host_state.replace(params=variables["params"],
                                        batch_stats=variables.get("batch_stats", {}))
    start_step = int(host_state.step)

    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    if start_step == 0:
        writer.write_hparams(config.to_dict())
    bn_axis = dp.axis_name if config.cross_device_bn else None
    p_train_step = dp.map(functools.partial(
        step_lib.train_step, axis_name=dp.axis_name, bn_axis_name=bn_axis,
        label_smoothing=config.label_smoothing, aux_loss_weight=config.aux_loss_weight,
        learning_rate_fn=setup.schedule), donate_argnums=(0,))
    p_eval_step = dp.map(functools.partial(step_lib.eval_step, axis_name=dp.axis_name))
    p_sync = dp.map(functools.partial(step_lib.sync_batch_stats, axis_name=dp.axis_name),
                    donate_argnums=(0,))
    state = dp.replicate(host_state)
    del host_state

    train_iter = dp.prefetch(input_pipeline.create_train_iterator(
        config.dataset, config.data_dir or None, config.batch_size, config.image_size,
        seed=config.seed, start_step=start_step, dtype=config.dtype,
        augment=config.augment or None, num_local_devices=dp.num_local_devices,
        process_index=jax.process_index(), process_count=jax.process_count()), config.prefetch)

    stop_at = total_steps
    if config.max_steps_per_run > 0:
        stop_at = min(total_steps, start_step + config.max_steps_per_run)
    bar = metrics_lib.ProgressBar(total_steps, start_step, enabled=is_main and config.progress_bar)
    if start_step:
        bar.write(f"resuming {config.arch} from step {start_step} in {checkpointer.directory}")

    eval_metrics: Optional[Dict[str, float]] = None
    best = _best_so_far(workdir, start_step) if is_main else None
    step, stopped = start_step, False
    pending: list = []
    interval_start, interval_steps = time.time(), 0
    try:
        with _StopSignal() as stop_signal:
            while step < stop_at:
                batch = next(train_iter)
                state, step_metrics = p_train_step(state, batch)
                pending.append(step_metrics)
                step += 1
                interval_steps += 1
                bar.update(1)

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
                _check_finite(dp, pending, step - len(pending) + 1)
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
                    eval_metrics = evaluate(p_eval_step, state, dp, config)
                    writer.write(step, "eval", eval_metrics)
                    bar.write(f"step {step}: val top-1 {100 * eval_metrics['top1']:.2f}% "
                              f"top-5 {100 * eval_metrics['top5']:.2f}% "
                              f"loss {eval_metrics['loss']:.4f}")
                    if best is None or eval_metrics["top1"] > best["top1"]:
                        best = {"top1": eval_metrics["top1"], "step": step}
                if do_save:
                    checkpointer.save(step, dp.unreplicate(state), meta,
                                      metrics={"top1": eval_metrics["top1"]} if do_eval else None)
                interval_start, interval_steps = time.time(), 0
                if stopped:
                    bar.write(f"SIGTERM: saved a checkpoint at step {step}; re-run the same "
                              "command to resume")
                    break
    finally:
        bar.close()
        checkpointer.close()
        writer.close()

    if step < total_steps and not stopped and is_main:
        print(f"stopped at step {step} of {total_steps} (max_steps_per_run); re-run the same "
              "command to continue", flush=True)
    stopped = stopped or step < total_steps
    if eval_metrics is None and not stopped:  # re-run of a finished job: report its model
        eval_metrics = evaluate(p_eval_step, state, dp, config)
    result: Dict[str, Any] = dict(eval_metrics or {})
    result.update(step=step, stopped=stopped, total_steps=total_steps)
    if is_main and not stopped:
        print(metrics_lib.summary_line(config.arch, config.dataset, step, time.time() - t_start,
                                       eval_metrics, best, workdir), flush=True)
    return result
