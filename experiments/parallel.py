"""Train a set's runs in worker processes, one CPU core each (``experiments.run --jobs``).

The experiments' networks are small (8-32 channels at 32 px, batch 16): inside one train step,
XLA's two threads wait on each other at every op. Two single-core runs side by side train more
images per second than one run on both cores: on this project's 2-core CPU, resnet20's step took
42 ms on each of two busy cores against 34 ms alone on both (1.6x the images per second), and
DenseNet-BC-52's 240-268 against 185 ms (1.4x).

Each worker is pinned to one core before it imports JAX, so XLA runs every program on one thread:
a run's numbers are the same whatever ``--jobs`` is and however many cores the machine has. They
are not those of an unpinned run on two threads: splitting an op between threads changes the
order of float32 sums. Where the system cannot pin a process (no ``os.sched_setaffinity``,
e.g. macOS), workers run unpinned and the numbers depend on the core count again.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

LOG_FILE = "train.log"  # what a worker's run printed, in the run's workdir


def cores() -> List[int]:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class Task:
    """One (experiment, variant, seed) to train; ``probe_from``: the (variant, seed) whose config
    draws the experiment's probe images, as :func:`experiments.common.run` does."""

    name: str
    label: str
    seed: int
    workdir: str
    probe_from: tuple
    cost: float  # MACs per image x training steps x batch: the order of the queue

    def __str__(self) -> str:
        return f"{self.name} / {self.label} / seed {self.seed}"


def plan(exps: Sequence[Any], seeds: Optional[Sequence[int]], variants: Optional[Sequence[str]],
         overrides: Mapping[str, Any], workdir_of: Callable[[str], str]) -> List[Task]:
    """Every run of the experiments ``exps`` that has to train, most expensive first (so that
    the last to finish are short). A config that two experiments share (their run keys are
    equal) trains once, in the first; the other reads it when the results are written. A run
    that is finished, or finished in a sibling experiment's workdir, is not planned."""
    from cnn_jax import configs, input_pipeline, optim
    from experiments import common

    tasks, keys = [], set()
    for exp in exps:
        name = exp.name
        labels = list(variants or exp.default_variants or exp.variants)
        run_seeds = list(exp.seeds if seeds is None else seeds)
        try:  # bad input: common.run says so in one line when the results are written
            todo = [(s, v, exp.variant_config(v, s, overrides)) for s in run_seeds for v in labels]
            for _, _, config in todo:
                configs.validate(config, check_paths=False)
        except (KeyError, ValueError):
            continue
        for seed, label, config in todo:
            key = common.run_key(exp, config)
            if key in keys:  # the same run as an earlier experiment's
                continue
            keys.add(key)
            info = input_pipeline.get_dataset_info(config.dataset, config.data_dir or None,
                                                   image_size=config.image_size)
            steps = optim.total_train_steps(config, info.num_train_examples, config.batch_size)
            workdir = common.run_dir(workdir_of(name), label, seed)
            if common.settled(workdir, steps, exp.plateau) or \
                    common._shared_run(workdir, key, steps, exp.plateau):
                continue
            _, macs = common.model_cost(config, info.num_classes)
            tasks.append(Task(name, label, int(seed), workdir, (labels[0], int(run_seeds[0])),
                              float(macs) * steps * config.batch_size))
    return sorted(tasks, key=lambda t: -t.cost)


def _worker(core: Optional[int], smoke: bool, overrides: Dict[str, Any], cache_dir: str,
            tasks, done) -> None:
    """A worker process: pin to ``core``, then train tasks until the queue says stop."""
    # Ctrl-C reaches the whole process group: the runner turns it into SIGTERM for each worker,
    # which its training loop answers with a checkpoint (a KeyboardInterrupt would lose the run).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})  # before JAX (and TensorFlow) size their thread pools
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    from cnn_jax import cli, hostmem

    # A spawned process: the runner's settings do not carry over. Without this every step of a
    # network whose saved activations pass glibc's mmap threshold (DenseNet-BC-34: 94 MB) maps
    # and faults them in afresh: 23,000 page faults and 35 of 135 ms of system time per step.
    reuses = hostmem.keep_freed_memory()

    cli.quiet_tensorflow_env("2")
    cli.import_tensorflow_quietly()
    import importlib

    from absl import logging

    from experiments import common

    logging.set_verbosity(logging.ERROR)
    cli.tune_gc()  # a spawned process: the runner's setting does not carry over
    if cache_dir:
        cli.enable_compilation_cache(cache_dir)
    while True:
        task = tasks.get()
        if task is None:
            return
        start = time.time()
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        try:
            os.makedirs(task.workdir, exist_ok=True)
            with open(os.path.join(task.workdir, LOG_FILE), "a") as log:
                os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
                print(f"worker pid {os.getpid()} on CPU cores {affinity}"
                      f"{'' if reuses else ' (step buffers not kept: see cnn_jax.hostmem)'}",
                      flush=True)
                exp = importlib.import_module(f"experiments.{task.name}").get_experiment(smoke)
                probe = common.probe_batch(exp.variant_config(*task.probe_from, overrides),
                                           exp.probe_size)
                run = common.train_run(exp, task.label, task.seed, task.workdir, overrides,
                                       probe, log=lambda m: print(m, flush=True))
            outcome = ("ok", f"{run.status}, best val top-1 {100 * run.best_top1():.1f}%"
                       if run.records else run.status)
        except common.Interrupted as e:
            outcome = ("interrupted", str(e))
        except Exception as e:  # noqa: BLE001 -- the parent reports it; the other runs go on
            outcome = ("error", f"{type(e).__name__}: {e}".splitlines()[0],
                       traceback.format_exc())
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        done.put((task, core, time.time() - start, *outcome))
        if outcome[0] == "interrupted":
            return


class _Stop(Exception):
    pass


def run(tasks: Sequence[Task], jobs: int, smoke: bool, overrides: Mapping[str, Any],
        cache_dir: str = "", log: Callable[[str], None] = print) -> Dict[str, str]:
    """Train ``tasks`` in ``jobs`` pinned workers; returns {experiment: first error} for the
    experiments a run failed in. SIGTERM or Ctrl-C: every worker saves a checkpoint and stops,
    and :class:`experiments.common.Interrupted` says to re-run the same command."""
    from experiments import common

    if not tasks:
        return {}
    where = cores()
    jobs = max(1, min(jobs, len(tasks)))
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: JAX not yet started
    todo, done = ctx.Queue(), ctx.Queue()
    for t in tasks:
        todo.put(t)
    for _ in range(jobs):
        todo.put(None)
    workers = [ctx.Process(target=_worker, name=f"experiments-worker-{i}",
                           args=(where[i % len(where)], smoke, dict(overrides), cache_dir,
                                 todo, done))
               for i in range(jobs)]
    log(f"training {len(tasks)} run(s) in {jobs} process(es), one CPU core each "
        f"(cores {', '.join(str(where[i % len(where)]) for i in range(jobs))}); each run's "
        f"output goes to {LOG_FILE} in its workdir")

    def stop(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, stop)
    errors: Dict[str, str] = {}
    finished, interrupted, start = 0, False, time.time()
    try:
        for w in workers:
            w.start()
        while finished < len(tasks) and not interrupted:
            try:
                task, core, seconds, status, message, *trace = done.get(timeout=2.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError("the experiment workers exited with runs left to train "
                                       f"(exit codes {[w.exitcode for w in workers]})") from None
                continue
            finished += 1
            elapsed = time.time() - start
            log(f"[{finished}/{len(tasks)}, {elapsed / 60:.1f} min] {task}: {status}: {message} "
                f"({seconds / 60:.1f} min on core {core})")
            if status == "error":
                log(trace[0].rstrip())
                errors.setdefault(task.name, f"{task}: {message}")
            interrupted = status == "interrupted"
    except (_Stop, KeyboardInterrupt):
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if interrupted:
            for w in workers:
                if w.is_alive():
                    w.terminate()  # SIGTERM: the training loop saves a checkpoint and stops
        for w in workers:
            w.join()
    if interrupted:
        raise common.Interrupted("the runs in progress stopped at a checkpoint; re-run the same "
                                 "command to resume")
    return errors
