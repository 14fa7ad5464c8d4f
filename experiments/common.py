"""The machinery behind every experiment: an experiment is a training config plus variants.

An :class:`Experiment` holds one training config of ``python -m cnn_jax.train`` (the file
``cnn_jax/configs/default.py`` with the experiment's overrides), its variants as overrides in the
same ``--config`` language (``{"arch": "plain56"}``, ``{"model.shortcut": "C"}``), the seeds, the
plateau criterion and the hypotheses it tests. :func:`run` trains every (variant, seed) with
:func:`cnn_jax.train_lib.train_and_evaluate` in its own workdir (a re-run resumes, and skips runs
that are finished), with two hooks the loop calls after every evaluation: the plateau criterion
(stops the run) and a probe of training images in evaluation mode (training loss and accuracy
without dropout or batch-statistics noise). What an experiment measures beyond that is a hook too
(per-layer gradient norms in activations.py).

Results go to ``experiments/results/<name>/``: ``runs.csv`` (one row per run), ``summary.csv``
(mean and standard deviation over seeds per variant), ``curves.csv`` (every record), ``<name>.png``
(curves with mean +- std bands and each run's plateau point) and ``README.md`` (hypotheses first,
then the command, setup, numbers, outcomes).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from experiments import stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = os.path.join(REPO_ROOT, "experiments", "results")
WORKDIR_ROOT = os.path.join(REPO_ROOT, "workdir", "experiments")
PROBE_SIZE = 500  # training images evaluated in eval mode at every evaluation
SMOKE_PROBE_SIZE = 32
SMOKE_DATASET = "shapes/32px_hard_n96_v32"


def training_config(**overrides):
    """The training command's default config (``cnn_jax/configs/default.py``) for the arch in
    ``overrides``, with the overrides (dotted keys, ``--config`` language) applied."""
    from cnn_jax import configs

    config = configs.load(configs.DEFAULT_CONFIG, overrides.get("arch", ""))
    apply(config, overrides)
    return config


def apply(config, overrides: Mapping[str, Any]) -> None:
    """``{"model.shortcut": "C", "num_epochs": 4}`` onto a config (as ``--config.*`` would);
    ``arch`` re-reads nothing (the recipe fields are set explicitly by each experiment)."""
    from cnn_jax import configs

    flat = {}
    for key, value in overrides.items():
        if key == "model" and isinstance(value, Mapping):  # {"model": {...}}: replaces options
            config.model = configs.model_config(value)
            continue
        flat[key] = tuple(value) if isinstance(value, list) else value
    configs.apply_overrides(config, flat)


DATASET = "shapes/32px_hard_n2000_v1000"
# The budget: EPOCHS of batch 16. Batch 16 costs nothing per image on this CPU (324 vs 322 img/s
# against batch 32 before the narrow-conv change below, 684 vs 524 after), so it doubles the steps
# of an epoch (resnet20 A seed 0 after 15 epochs: 53.2% best val top-1 against 42.4%
# at batch 32; lr 1e-2 at batch 32: 51.2%; at batch 16 lr 1e-3 and 1e-2 both learn slower than
# 3e-3). At 15 epochs every learning run was still rising. Once the narrow networks' train step
# was twice as fast (XLA's weight gradients below 64 x 64 channels, cnn_jax/models/layers.py),
# 25 epochs brought resnet20 A to 66.5 / 70.6 / 70.6% (seeds 0-2), two of three meeting PLATEAU
# at epochs 24 and 25 and the third one evaluation short of it; 30 epochs gave the cosine's flat
# tail room for the criterion (2026-12-03). 24 since 2026-12-04: at 30 the default set took 127
# min on a slow afternoon of this 2-core host (~100 at best) and degradation alone 36 min, over
# the 100 / 30-minute budgets; the loss term of PLATEAU stops a learning run only in the last
# epochs of its cosine anyway, so a shorter cosine costs the runs accuracy, not their plateau.
# The 24-epoch set took 85.6 min in one fresh invocation (2026-12-04, experiments/README.md).
# Since 2026-12-05 the schedule is not a cosine but constant with one drop at a plateau (PLATEAU):
# with the cosine, whether a run met the criterion depended on where its last evaluations fell in
# the schedule's tail (24 epochs: 20 of 39 runs; 40 epochs: 8 of 9 in shortcuts), and a longer
# cosine kept raising every result (shortcuts A 67.5 -> 76.1% from 24 to 40 epochs). With the
# drop, every run that learns ends on a validation plateau at the lower rate. EPOCHS is then a
# cap, reached by no run of the pilots: resnet20 A seed 0 dropped at epoch 22 and stopped at 30
# (78.6% best), pre-activation seed 0 at 24 and 30 (73.9%); a second drop to 3e-5 added nothing
# in either (78.6 and 73.9% again), so there is one.
# 80 since 2026-12-06: at 40, 9 of the default set's runs reached the cap still rising (the three
# DenseNets, which plateau at epochs 52-53, and 6 late runs), and PLATEAU's bounds are epochs, so
# a higher cap changes no run that stopped before the old one: raising it went on with those 9
# from their checkpoints at epoch 40.
BATCH_SIZE = 16
EPOCHS = 80.0
EVALS_PER_EPOCH = 1
# Images per forward pass of an evaluation (validation and train probe). Small batches keep a
# pass's activations in cache: the train probe's 500 images in one pass took 3.6 ms per image in
# DenseNet-BC-52 on one core and 0.91 in resnet20, in passes of 25 1.7 and 0.73 (20: 1.6 / 0.75,
# 50: 2.0 / 0.72, 100: 2.3 / 0.74). At 250 and 500 a DenseNet run's evaluations of 1,500 images
# cost 7.1 s of each 38.6 s epoch. 2026-12-03.
EVAL_BATCH = 25
# Validation only: a stall of the noisy top-1 at the high rate lowers the rate rather than ending
# the run (the loss term was there to keep such stalls from stopping runs); min_epochs: no drop
# before epoch 8 (a fifth of the 40 epochs these were set for). min_top1 and stuck_epochs: a run
# still at chance (below twice chance, 10% on the 20 classes) takes no drop before epoch 16. With
# only the epoch-8 bound, the 2026-12-05 set dropped 12 runs at chance at epoch 8, where a tenth
# of the rate ends any chance of starting; in a pilot with the first drop not before epoch 16,
# plain32 seed 1 and DenseNet-BC seed 2 left chance and reached 50.4 and 50.8% (plain32 seeds 0
# and 2 did not).
PLATEAU = stats.Plateau(patience=3, min_delta=0.005, min_epochs=8, max_loss_drop=None,
                        drops=1, factor=0.1, min_top1=0.1, stuck_epochs=16)


def recipe(smoke: bool, arch: str = "resnet20", **overrides):
    """The training config the experiments share (each may change fields): the hard `shapes`
    level, AdamW (in budgets of a few thousand steps it gets much further than SGD) at a constant
    rate after warmup, divided by 10 at the first plateau (``PLATEAU``), batch 16, flips only, one
    evaluation per epoch, at most 80 epochs; --smoke: 96 images, one epoch of 6 steps, one
    evaluation."""
    from cnn_jax import input_pipeline, optim

    values = dict(
        arch=arch, dataset=SMOKE_DATASET if smoke else DATASET, image_size=32,
        augment="none,flip=true", batch_size=BATCH_SIZE,
        num_epochs=1.0 if smoke else EPOCHS, optimizer="adamw", learning_rate=3e-3,
        lr_reference_batch_size=0, lr_schedule="constant", warmup_epochs=0.3, weight_decay=1e-4,
        weight_decay_skip_bn_bias=True, grad_clip_norm=5.0, keep_checkpoints=1,
        async_checkpointing=False, progress_bar=False, eval_batch_size=32 if smoke else EVAL_BATCH)
    values.update(overrides)
    info = input_pipeline.get_dataset_info(values["dataset"], values.get("data_dir") or None,
                                           image_size=values["image_size"])
    every = max(1, optim.steps_per_epoch(info.num_train_examples, values["batch_size"])
                // (1 if smoke else EVALS_PER_EPOCH))
    values.setdefault("eval_every_steps", every)
    values.setdefault("log_every_steps", every)
    return training_config(**values)


@dataclasses.dataclass(frozen=True)
class Outcome:
    verdict: str  # "confirmed" | "not confirmed" | "inconclusive"
    why: str

    def __post_init__(self):
        if self.verdict not in ("confirmed", "not confirmed", "inconclusive"):
            raise ValueError(f"bad verdict {self.verdict!r}")


def greater(r: "Results", a: str, b: str, metric: str, percent: bool = True,
            confirmed_if: str = "greater", note: str = "") -> Outcome:
    """Tests ``metric(a) > metric(b)`` (``confirmed_if="less"``: ``<``) by Welch's 95% CI."""
    missing = [v for v in (a, b) if not r.of(v)]
    if missing:
        return Outcome("inconclusive", f"{', '.join(missing)} not run (see --variants).")
    d = r.compare(a, b, metric)
    scale, unit = (100.0, " points") if percent else (1.0, " nats" if "loss" in metric else "")
    line = f"{metric} {a} - {b}: {d.describe(scale, unit)}."
    want = d.diff > 0 if confirmed_if == "greater" else d.diff < 0
    if d.significant and want:
        return Outcome("confirmed", f"{line} {note}".strip())
    if d.significant:
        return Outcome("not confirmed", f"{line} The difference goes the other way. {note}".strip())
    return Outcome("inconclusive", f"{line} The interval includes 0: no difference shown with "
                   f"{d.n_a} and {d.n_b} seeds. {note}".strip())


def equivalent(r: "Results", labels: Sequence[str], metric: str, margin: float) -> Outcome:
    """``about equal``: every pairwise 95% CI lies within +-margin (confirmed); a significant
    difference beyond the margin: not confirmed; otherwise inconclusive."""
    missing = [v for v in labels if not r.of(v)]
    if missing:
        return Outcome("inconclusive", f"{', '.join(missing)} not run (see --variants).")
    lines, inside, beyond = [], True, False
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            d = r.compare(a, b, metric)
            lines.append(f"{a} - {b}: {d.describe()}")
            inside &= math.isfinite(d.low) and -margin <= d.low and d.high <= margin
            beyond |= d.significant and abs(d.diff) > margin
    text = "; ".join(lines) + f". Margin: +-{100 * margin:.0f} points."
    if inside:
        return Outcome("confirmed", text + " Every interval lies inside the margin.")
    if beyond:
        return Outcome("not confirmed", text + " A difference beyond the margin is significant.")
    return Outcome("inconclusive", text + " Some interval reaches beyond the margin (too few "
                   "seeds or too noisy to show equality), none is significantly beyond it.")


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A claim of a paper, the prediction it makes here (written before any number), a test of
    the results, and the command that would test the paper's own setting."""

    name: str
    claim: str
    prediction: str
    test: Callable[["Results"], Outcome]
    paper_command: str = ""


@dataclasses.dataclass
class Experiment:
    name: str
    title: str
    intro: str
    config: Any  # ml_collections.ConfigDict: the training config every variant starts from
    variants: Dict[str, Dict[str, Any]]  # label -> overrides
    seeds: Tuple[int, ...] = (0, 1, 2)
    plateau: stats.Plateau = PLATEAU
    hypotheses: Sequence[Hypothesis] = ()
    caveats: Sequence[str] = ()
    # (config, probe images, probe labels) -> extra hooks of one run
    hooks: Optional[Callable[..., List[Callable]]] = None
    # (results, out dir) -> extra (heading, markdown) tables; may write files and figures
    analyse: Optional[Callable[["Results", str], List[Tuple[str, str]]]] = None
    probe_size: int = PROBE_SIZE
    default_variants: Optional[Tuple[str, ...]] = None  # None: all of them
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # for the tests/analysis

    def variant_config(self, label: str, seed: int, overrides: Mapping[str, Any] = ()):
        config = self.config.copy_and_resolve_references()
        apply(config, self.variants[label])
        apply(config, dict(overrides))
        config.seed = int(seed)
        return config


# ------------------------------------------------------------------------------------ hooks


class PlateauHook:
    """Stops the run when :class:`stats.Plateau` holds for its evaluations so far: at its last
    hold with a ``plateau`` record; at a hold before (one that lowers the learning rate) with
    ``dropped_at`` set to the step, for :func:`train_run` to go on at the lower rate."""

    def __init__(self, plateau: stats.Plateau,
                 history: Sequence[Tuple[int, float, float]] = ()):
        self.plateau = plateau
        # (step, val top-1, training loss) of the evaluations before a resume
        self.history = [tuple(h) for h in history]
        self.dropped_at: Optional[int] = None

    def __call__(self, event) -> None:
        if event.metrics is None:
            return
        loss = (event.train_metrics or {}).get("loss", math.nan)
        self.history.append((event.step, event.metrics["top1"], loss))
        holds = self.plateau.holds_of(self.history, event.steps_per_epoch)
        if not holds or holds[-1] != len(self.history) - 1:
            return
        if len(holds) > self.plateau.drops:
            event.write("plateau", self.plateau.record())
        else:
            self.dropped_at = event.step
        event.stop = True


def eval_mode_metrics(state, images, labels, chunk: int = 0) -> Dict[str, Any]:
    """Loss and top-1 of ``images`` in evaluation mode (running BN statistics, no dropout);
    ``chunk`` > 0: forward passes of that many images at a time (one ``lax.map``), which on a CPU
    keeps each pass's activations in cache (see ``EVAL_BATCH``)."""
    import jax
    import jax.numpy as jnp
    import optax

    def one(x, y):
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                                train=False)
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        return loss, jnp.argmax(logits, -1) == y

    n = images.shape[0]
    if 0 < chunk < n and n % chunk == 0:
        loss, hits = jax.lax.map(lambda xy: one(*xy), (
            images.reshape((n // chunk, chunk) + images.shape[1:]), labels.reshape(-1, chunk)))
    else:
        loss, hits = one(images, labels)
    return {"loss": jnp.mean(loss), "top1": jnp.mean(hits)}


class TrainProbeHook:
    """Evaluates a fixed set of training images in evaluation mode at every evaluation (split
    ``train_probe``): the training fit without augmentation, dropout or batch noise."""

    def __init__(self, images, labels):
        import jax

        self.images, self.labels = images, labels
        self.fn = jax.jit(functools.partial(eval_mode_metrics, chunk=EVAL_BATCH))

    def __call__(self, event) -> None:
        if event.metrics is None:
            return
        out = self.fn(event.state, self.images, self.labels)
        event.write("train_probe", {k: float(v) for k, v in out.items()})


# (dataset, data_dir, image_size, split, n) -> probe_batch's arrays: the experiments of one
# invocation mostly share a dataset, and each tf.data pipeline costs about half a second.
_PROBE_CACHE: Dict[tuple, Tuple[np.ndarray, np.ndarray]] = {}


def probe_batch(config, n: int, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of ``split`` with the evaluation preprocessing (centre crop,
    normalization), as numpy: the same images in every run and at every evaluation."""
    key = (config.dataset, config.data_dir or None, int(config.image_size), split, int(n))
    if key not in _PROBE_CACHE:
        _PROBE_CACHE[key] = _probe_batch(config, n, split)
    images, labels = _PROBE_CACHE[key]
    return images.copy(), labels.copy()


def _probe_batch(config, n: int, split: str) -> Tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    from cnn_jax import preprocessing, train_lib
    from cnn_jax.datasets import sources

    train_lib._prepare_shapes(config)  # generates `shapes` on first use, quietly
    builder = sources.get_builder(config.dataset, config.data_dir or None, config.image_size)
    spec = sources.spec(config.dataset, builder)
    name = spec.train_split if split == "train" else spec.eval_split
    n = min(n, builder.info.splits[name].num_examples)
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=f"{name}[:{n}]", shuffle_files=False,
                            decoders={spec.image_key: tfds.decode.SkipDecoding()})

    def prep(ex):
        return (preprocessing.preprocess_for_eval(
            ex[spec.image_key], config.image_size, jpeg=spec.jpeg,
            crop_ratio=spec.eval_crop_ratio, mean=spec.mean, std=spec.std),
            tf.cast(ex[spec.label_key], tf.int32))

    images, labels = next(iter(tfds.as_numpy(ds.map(prep).batch(n))))
    return np.asarray(images, np.float32), np.asarray(labels, np.int32)


# ------------------------------------------------------------------------------------ runs


@dataclasses.dataclass
class Run:
    """One (variant, seed): its records (metrics.jsonl) and what it cost."""

    variant: str
    seed: int
    arch: str
    params: int
    macs: int
    records: List[Dict[str, Any]]
    steps_per_epoch: int
    total_steps: int
    wall_seconds: float
    error: str = ""
    shared_from: str = ""  # another experiment's run of the same config, read instead of trained
    devices: Tuple[str, ...] = ()  # what it trained on (DEVICE_FILE; empty: not recorded)

    def split(self, name: str) -> List[Dict[str, Any]]:
        return [r for r in self.records if r.get("split") == name]

    @property
    def steps(self) -> int:
        return max((int(r["step"]) for r in self.split("train")), default=0)

    @property
    def epochs(self) -> float:
        return self.steps / max(self.steps_per_epoch, 1)

    @property
    def plateaued(self) -> bool:  # train_run keeps only the current criterion's record
        return bool(self.split("plateau"))

    @property
    def drop_epochs(self) -> List[float]:
        """The epochs at which a plateau lowered the learning rate."""
        return [int(r["step"]) / max(self.steps_per_epoch, 1) for r in self.split(LR_DROP)]

    @property
    def status(self) -> str:
        if self.shared_from:
            return f"{dataclasses.replace(self, shared_from='').status} (= {self.shared_from})"
        if self.error:
            return self.error
        drops = "".join(f" (lr dropped at epoch {e:.1f})" for e in self.drop_epochs)
        if self.plateaued:
            return f"plateau at epoch {self.epochs:.1f}{drops}"
        end = "budget" if self.steps >= self.total_steps else f"incomplete ({self.steps} steps)"
        return end + drops

    def best_top1(self) -> float:
        return max((float(r["top1"]) for r in self.split("eval")), default=math.nan)

    def final(self, split: str, key: str) -> float:
        recs = self.split(split)
        return float(recs[-1][key]) if recs and key in recs[-1] else math.nan

    def at_best(self, split: str, key: str) -> float:
        """``split``'s ``key`` at the evaluation with the best val top-1 (the kept checkpoint)."""
        evals = self.split("eval")
        if not evals:
            return math.nan
        step = max(evals, key=lambda r: r["top1"])["step"]
        for r in self.split(split):
            if r["step"] == step and key in r:
                return float(r[key])
        return math.nan

    def metric(self, name: str) -> float:
        """Named scalar metrics of a run (what tables and hypothesis tests read)."""
        if name == "best_val_top1":
            return self.best_top1()
        if name == "final_val_top1":
            return self.final("eval", "top1")
        if name == "final_val_loss":
            return self.final("eval", "loss")
        if name == "train_loss":  # training images, eval mode, at the end
            return self.final("train_probe", "loss")
        if name == "train_top1":
            return self.final("train_probe", "top1")
        if name == "gap":  # train - val top-1 at the end (overfitting)
            return self.final("train_probe", "top1") - self.final("eval", "top1")
        if name == "epochs":
            return self.epochs
        if name == "wall_seconds":
            return self.wall_seconds
        raise KeyError(name)


class Interrupted(Exception):
    """A run stopped before its end (SIGTERM): the set stops too, resumable."""


def settled(workdir: str, total_steps: int, plateau: stats.Plateau) -> bool:
    """A run that will not train again: finished (``plateau`` or budget) or diverged."""
    from cnn_jax import metrics as metrics_lib

    records = metrics_lib.read_metrics(workdir) if os.path.exists(workdir) else []
    return _finished(records, total_steps, plateau) or \
        os.path.exists(os.path.join(workdir, DIVERGED_FILE))


DIVERGED_FILE = "diverged.txt"


def _finished(records: Sequence[Dict[str, Any]], total_steps: int, plateau: stats.Plateau) -> bool:
    """Stopped by ``plateau`` or at the budget, with no stop of another criterion on record (that
    one is judged again first: :func:`_restate_plateau`)."""
    if _stale_stop(records, plateau):
        return False
    return any(r.get("split") == "plateau" for r in records) or any(
        r.get("split") == "eval" and int(r["step"]) >= total_steps for r in records)


def _stale_stop(records: Sequence[Dict[str, Any]], plateau: stats.Plateau) -> bool:
    return any(r.get("split") == "plateau" and not plateau.matches(r) for r in records)


def _history(records: Sequence[Dict[str, Any]]) -> List[Tuple[int, float, float]]:
    """(step, val top-1, training loss) at each evaluation of a run's records."""
    losses = {int(r["step"]): float(r["loss"]) for r in records if r.get("split") == "train"}
    return [(int(r["step"]), float(r["top1"]), losses.get(int(r["step"]), math.nan))
            for r in records if r.get("split") == "eval"]


def _restate_plateau(exp: Experiment, workdir: str, records: List[Dict[str, Any]],
                     steps_per_epoch: int, total: int, learning_rate: float,
                     log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """A run's plateau stop and learning-rate drops, taken under another criterion (or a stop at
    another epoch cap), judged by ``exp.plateau``. Where this criterion lowers the rate at the
    same steps up to the run's last evaluation, the run is this criterion's too: finished at a
    stop this criterion also takes there (the record is rewritten), or not yet (the record goes
    and the run resumes from its last checkpoint: the same steps as an uninterrupted run, at the
    lower rate where this criterion lowers it there; a stop at the budget stays a budget end).
    A criterion that would have lowered the rate or stopped before cannot be met by resuming: an
    error says to train the run again. ``learning_rate``: the run's rate before any drop."""
    from cnn_jax import metrics as metrics_lib

    history = _history(records)
    if not history:
        return records
    last = history[-1][0]
    holds = [history[i][0] for i in exp.plateau.holds_of(history, steps_per_epoch)]
    drops = sorted(int(r["step"]) for r in records if r.get("split") == LR_DROP)
    if len(drops) > exp.plateau.drops or holds[:len(drops)] != drops:
        would = holds[:exp.plateau.drops] or "no step"
        raise ValueError(f"{workdir} lowered its learning rate at step(s) {drops or 'none'} "
                         f"under another plateau criterion; this one would at {would}: remove "
                         "the workdir to train the run again under this criterion")
    rest = holds[len(drops):]  # this criterion's next hold, if any, up to the last evaluation
    if rest and rest[0] < last:
        what = "stops it" if len(drops) == exp.plateau.drops else "lowers its learning rate"
        raise ValueError(f"{workdir} ran to step {last} under another plateau criterion; this one "
                         f"{what} at step {rest[0]}, before it: remove the workdir to train the "
                         "run again under this criterion")
    stops = [int(r["step"]) for r in records if r.get("split") == "plateau"]
    if stops:
        metrics_lib.remove_records(workdir, lambda r: r.get("split") == "plateau")
    end = "plateau stop" if stops else "last evaluation"
    if rest:  # this criterion holds at the run's last evaluation: its stop, or a drop there
        writer = metrics_lib.MetricWriter(workdir)
        if len(drops) == exp.plateau.drops:
            writer.write(last, "plateau", exp.plateau.record())
            log(f"{workdir}: its {end} at step {last} is a plateau stop under this criterion too")
        else:  # as train_run after a drop: the run goes on from that checkpoint at the lower rate
            rate = learning_rate * exp.plateau.factor ** (len(drops) + 1)
            writer.write(last, LR_DROP, {"learning_rate": rate})
            log(f"{workdir}: this criterion lowers the learning rate at its {end} (step {last}); "
                "it resumes from there")
        writer.close()
    elif stops and last >= total:
        log(f"{workdir}: its plateau stop at step {last} was another criterion's; this one does "
            "not hold there, the budget's end")
    elif stops:
        log(f"{workdir}: its plateau stop at step {last} was another criterion's; this one "
            "resumes it from there")
    return metrics_lib.read_metrics(workdir)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def run_dir(root: str, label: str, seed: int) -> str:
    """The workdir of one (variant, seed) under an experiment's workdir ``root``."""
    return os.path.join(root, slug(label), f"seed{seed}")


# (arch, options, classes, image size) -> (params, MACs): every seed of a variant, and a re-run
# that reads finished runs, would trace the same model again.
_COST_CACHE: Dict[tuple, Tuple[int, int]] = {}


def model_cost(config, num_classes: int) -> Tuple[int, int]:
    """(parameters by ``cnn_jax.models.count_params``, MACs per image by cnn_jax.analysis)."""
    from cnn_jax import analysis, configs
    from cnn_jax.models import abstract_variables, check_model_options, count_params, \
        create_model

    options = check_model_options(config.arch, configs.model_options(config))
    key = (config.arch, repr(sorted(options.items())), int(num_classes), int(config.image_size))
    if key not in _COST_CACHE:
        model = create_model(config.arch, num_classes=num_classes, **options)
        variables = abstract_variables(model, config.image_size)  # traced once, for both
        params = count_params(variables["params"])
        macs = analysis.analyze(model, (1, config.image_size, config.image_size, 3),
                                variables=variables).totals.macs
        _COST_CACHE[key] = (params, macs)
    return _COST_CACHE[key]


RUN_KEY_FILE = "run_key.txt"
LR_DROP = "lr_drop"  # the split of a record that lowered the learning rate at a plateau


# What a run trained on, one line each (the CPU's cnn_jax.host.cpu_name, or the accelerator's
# kind): XLA's kernels, and so the run's float32 rounding, depend on it, so the write-up names it
# beside the numbers.
DEVICE_FILE = "device.txt"


def _read_devices(workdir: str) -> Tuple[str, ...]:
    path = os.path.join(workdir, DEVICE_FILE)
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        return tuple(line.strip() for line in f if line.strip())


def _record_device(workdir: str) -> None:
    import jax

    from cnn_jax import host

    name = host.cpu_name() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    if name not in _read_devices(workdir):  # a run resumed on another device adds a line
        with open(os.path.join(workdir, DEVICE_FILE), "a") as f:
            f.write(name + "\n")


def run_key(exp: Experiment, config) -> str:
    """What makes two runs one: the training config with the model resolved to every field of the
    built module (defaults included: `shortcut` A given or not is one model) and what the
    experiment measures (its hooks, its probe). Experiments that share a config (resnet20 is
    `shortcuts`' A, `bn_placement`'s post, `degradation`'s resnet20 and `resnet_vs_densenet`'s
    baseline) then train it once. The epoch budget is not part of it where the learning rate does
    not depend on it (a constant or step schedule after a warmup that ends before the budget):
    a run under a higher cap is the same run, gone on from where the lower one ended."""
    from cnn_jax import configs, optim
    from cnn_jax.models import check_model_options, create_model

    module = create_model(config.arch, num_classes=1,
                          **check_model_options(config.arch, configs.model_options(config)))
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.name not in ("parent", "name", "num_classes")}
    budget = () if optim.schedule_uses_budget(config) else ("num_epochs", "num_train_steps")
    training = {k: v for k, v in config.to_dict().items()
                if k not in ("arch", "model") + budget}
    hooks = getattr(exp.hooks, "__qualname__", repr(exp.hooks)) if exp.hooks else ""
    text = json.dumps({"module": type(module).__name__, "fields": fields, "config": training,
                       "hooks": hooks, "probe_size": exp.probe_size}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shared_run(workdir: str, key: str, total: int, plateau: stats.Plateau
                ) -> Optional[Tuple[str, list, float, Tuple[str, ...]]]:
    """A run of the same key in a sibling experiment's workdir (same seed), finished under
    ``plateau`` or at the budget:
    (its ``experiment/variant`` label, records, wall seconds, devices), or None."""
    from cnn_jax import metrics as metrics_lib

    seed_dir = os.path.basename(workdir)
    base = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(workdir))))
    for path in sorted(glob.glob(os.path.join(base, "*", "*", seed_dir, RUN_KEY_FILE))):
        other = os.path.dirname(path)
        if other == os.path.abspath(workdir) or open(path).read().strip() != key:
            continue
        records = metrics_lib.read_metrics(other)
        if _finished(records, total, plateau):
            seconds = os.path.join(other, "wall_seconds.txt")
            wall = float(open(seconds).read()) if os.path.exists(seconds) else 0.0
            exp_dir, variant_dir = os.path.split(os.path.dirname(other))
            return f"{os.path.basename(exp_dir)}/{variant_dir}", records, wall, _read_devices(other)
    return None


def train_run(exp: Experiment, label: str, seed: int, workdir: str,
              overrides: Mapping[str, Any] = (), probe=None, log=print, train: bool = True) -> Run:
    """Train one (variant, seed) unless its workdir holds a finished run; resumes otherwise
    (``train=False``: a run that is not finished is an error)."""
    from cnn_jax import input_pipeline, optim, train_lib
    from cnn_jax import metrics as metrics_lib

    config = exp.variant_config(label, seed, overrides)
    info = input_pipeline.get_dataset_info(config.dataset, config.data_dir or None,
                                           image_size=config.image_size)
    spe = optim.steps_per_epoch(info.num_train_examples, config.batch_size)
    total = optim.total_train_steps(config, info.num_train_examples, config.batch_size)
    params, macs = model_cost(config, info.num_classes)
    records = metrics_lib.read_metrics(workdir) if os.path.exists(workdir) else []
    key = run_key(exp, config)
    key_file = os.path.join(workdir, RUN_KEY_FILE)
    if records and os.path.exists(key_file):
        with open(key_file) as f:
            if f.read().strip() != key:
                raise ValueError(f"{workdir} holds a run of another training config (another "
                                 "--config.*, or an older recipe); remove it to train this one, "
                                 "or pass another --workdir")
    seconds_file = os.path.join(workdir, "wall_seconds.txt")
    wall = float(open(seconds_file).read()) if os.path.exists(seconds_file) else 0.0
    error = ""
    diverged_file = os.path.join(workdir, DIVERGED_FILE)
    # A stop of another criterion, or a run that goes on (a higher epoch cap, an interruption):
    # judged by this criterion first.
    if _stale_stop(records, exp.plateau) or not (_finished(records, total, exp.plateau)
                                                 or os.path.exists(diverged_file)):
        records = _restate_plateau(exp, workdir, records, spe, total, config.learning_rate, log)
    if not _finished(records, total, exp.plateau) and not os.path.exists(diverged_file):
        shared = _shared_run(workdir, key, total, exp.plateau)
        if shared:
            log(f"--- {exp.name} / {label} / seed {seed}: the same run as {shared[0]}; read, "
                "not trained again")
            return Run(label, seed, config.arch, params, macs, shared[1], spe, total, shared[2],
                       shared_from=shared[0], devices=shared[3])
        if not train:
            raise RuntimeError(f"{exp.name} / {label} / seed {seed} has not finished training "
                               f"(workdir {workdir}); re-run the same command to train it")
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, RUN_KEY_FILE), "w") as f:
            f.write(key)
        _record_device(workdir)
        log(f"--- {exp.name} / {label} / seed {seed}: {config.arch} {dict(exp.variants[label])} "
            f"({params:,} parameters, {macs / 1e6:.1f}M MACs/image)")
        if probe is None:
            probe = probe_batch(config, exp.probe_size)
        start = time.time()
        interrupted = False
        while True:  # one training per learning rate: each drop resumes from its checkpoint
            drops = len([r for r in records if r.get("split") == LR_DROP])
            phase = config.copy_and_resolve_references()
            phase.learning_rate = config.learning_rate * exp.plateau.factor ** drops
            plateau_hook = PlateauHook(exp.plateau, _history(records))
            hooks = [TrainProbeHook(*probe), plateau_hook]
            if exp.hooks:
                hooks += exp.hooks(phase, *probe)
            try:
                result = train_lib.train_and_evaluate(phase, workdir, hooks=hooks)
                # SIGTERM (or max_steps_per_run): the loop saved a checkpoint; stop the whole set
                interrupted = (result["stopped"] and not result.get("stopped_by_hook")
                               ) or result.get("sigterm", False)
            except train_lib.NonFiniteLossError as e:
                error = "diverged: " + str(e).split(";")[0]
                log(f"{label} seed {seed}: {error}")
                break
            if interrupted or plateau_hook.dropped_at is None:
                break
            # Written once the loop has saved that step's checkpoint, so that a resume never
            # finds a drop its checkpoint has not reached.
            writer = metrics_lib.MetricWriter(workdir)
            writer.write(plateau_hook.dropped_at, LR_DROP,
                         {"learning_rate": phase.learning_rate * exp.plateau.factor})
            writer.close()
            log(f"{exp.name} / {label} / seed {seed}: plateau at step {plateau_hook.dropped_at}; "
                f"learning rate x{exp.plateau.factor:g}")
            records = metrics_lib.read_metrics(workdir)
        wall += time.time() - start
        os.makedirs(workdir, exist_ok=True)
        with open(seconds_file, "w") as f:
            f.write(f"{wall:.1f}")
        if interrupted:
            raise Interrupted(f"{exp.name} / {label} / seed {seed} stopped at a checkpoint; "
                              "re-run the same command to resume")
        records = metrics_lib.read_metrics(workdir)
    elif os.path.exists(diverged_file):  # a diverged run is finished too: it would again
        error = open(diverged_file).read().strip()
    if error:
        with open(diverged_file, "w") as f:
            f.write(error)
    return Run(label, seed, config.arch, params, macs, records, spe, total, wall, error,
               devices=_read_devices(workdir))


@dataclasses.dataclass
class Results:
    exp: Experiment
    runs: List[Run]
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)  # --config.* of the run
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what ``analyse`` found

    def config(self, label: Optional[str] = None, seed: int = 0):
        """The training config of a variant (default: the first) with the run's overrides."""
        return self.exp.variant_config(label or self.labels[0], seed, self.overrides)

    def shared_config(self):
        """The config every variant starts from, with the run's overrides (``--config.*``)."""
        config = self.exp.config.copy_and_resolve_references()
        apply(config, self.overrides)
        return config

    @property
    def labels(self) -> List[str]:
        return list(dict.fromkeys(r.variant for r in self.runs))

    def of(self, label: str) -> List[Run]:
        return [r for r in self.runs if r.variant == label]

    def values(self, label: str, metric: str) -> List[float]:
        return [r.metric(metric) for r in self.of(label)]

    def mean(self, label: str, metric: str) -> float:
        return stats.mean_std(self.values(label, metric))[0]

    def compare(self, a: str, b: str, metric: str) -> stats.Difference:
        return stats.welch(self.values(a, metric), self.values(b, metric))

    def has(self, *labels: str) -> bool:
        return all(self.of(label) for label in labels)


def run(exp: Experiment, *, seeds: Optional[Sequence[int]] = None,
        variants: Optional[Sequence[str]] = None, overrides: Mapping[str, Any] = (),
        workdir: Optional[str] = None, out: Optional[str] = None, command: str = "",
        log: Callable[[str], None] = None, jobs: int = 0, start: Optional[float] = None
        ) -> Results:
    """Train (or resume, or read) every selected (variant, seed) and write the results.
    ``jobs`` > 0: the runs were trained by ``jobs`` single-core workers (experiments/parallel.py)
    since ``start``; here they are only read."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    labels = list(variants or exp.default_variants or exp.variants)
    unknown = [v for v in labels if v not in exp.variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)} of {exp.name}; choose from "
                         f"{', '.join(exp.variants)}")
    seeds = list(exp.seeds if seeds is None else seeds)
    root = os.path.abspath(workdir or os.path.join(WORKDIR_ROOT, exp.name))
    for label in labels:  # every config is checked before anything trains
        from cnn_jax import configs

        configs.validate(exp.variant_config(label, seeds[0], overrides), check_paths=False)
    start = time.time() if start is None else start
    probe = None
    runs = []
    out = out or os.path.join(RESULTS_ROOT, exp.name)
    for i, seed in enumerate(seeds):  # seeds outermost: a partial set has every variant
        for label in labels:
            if probe is None:
                probe = probe_batch(exp.variant_config(label, seed, overrides), exp.probe_size)
            try:
                runs.append(train_run(exp, label, seed,
                                      run_dir(root, label, seed), overrides,
                                      probe, log, train=not jobs))
            except Interrupted:
                if runs:  # what finished before the stop
                    write_results(Results(exp, runs, dict(overrides),
                                          {"probe_size": len(probe[1])}),
                                  out, command, time.time() - start, partial=True, jobs=jobs)
                raise
        results = Results(exp, list(runs), dict(overrides), {"probe_size": len(probe[1])})
        if i + 1 < len(seeds) and not jobs:  # what has finished so far, in case of a stop
            write_results(results, out, command, time.time() - start, partial=True, jobs=jobs)
    write_results(results, out, command, time.time() - start, jobs=jobs)
    return results


# ------------------------------------------------------------------------------------ output

RUN_COLUMNS = ("variant", "seed", "arch", "params", "macs", "steps", "epochs", "status",
               "train_loss", "train_top1", "final_val_loss", "final_val_top1", "best_val_top1",
               "gap", "wall_seconds")
SUMMARY_METRICS = ("epochs", "train_loss", "train_top1", "best_val_top1", "final_val_top1", "gap",
                   "wall_seconds")
CURVE_COLUMNS = ("variant", "seed", "split", "step", "epoch", "loss", "accuracy", "top1", "top5",
                 "grad_norm", "learning_rate")


def run_row(r: Run) -> Dict[str, Any]:
    row = {"variant": r.variant, "seed": r.seed, "arch": r.arch, "params": r.params,
           "macs": r.macs, "steps": r.steps, "epochs": round(r.epochs, 2), "status": r.status}
    for m in RUN_COLUMNS[8:]:
        row[m] = r.metric(m)
    return row


def summary_rows(results: Results) -> List[Dict[str, Any]]:
    rows = []
    for label in results.labels:
        runs = results.of(label)
        row = {"variant": label, "arch": runs[0].arch, "params": runs[0].params,
               "macs": runs[0].macs, "seeds": len(runs),
               "plateaued": sum(r.plateaued for r in runs),
               "overrides": " ".join(f"{k}={v}" for k, v in results.exp.variants[label].items())}
        for m in SUMMARY_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = stats.mean_std(results.values(label, m))
        rows.append(row)
    return rows


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else ()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k, "")) for k in columns})
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pm(mean: float, std: float, percent: bool = True, digits: int = 1) -> str:
    """``41.2 ± 1.3%`` (or ``1.234 ± 0.010``)."""
    if not math.isfinite(mean):
        return "-"
    if percent:
        return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}%"
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: Results) -> str:
    rows = []
    for s in summary_rows(results):
        rows.append([s["variant"], f"{s['params']:,}", f"{s['macs'] / 1e6:.1f}M",
                     f"{s['seeds']}", f"{s['plateaued']}/{s['seeds']}",
                     f"{s['epochs_mean']:.1f}",
                     pm(s["train_loss_mean"], s["train_loss_std"], percent=False),
                     pm(s["train_top1_mean"], s["train_top1_std"]),
                     pm(s["best_val_top1_mean"], s["best_val_top1_std"]),
                     pm(s["gap_mean"], s["gap_std"]), f"{s['wall_seconds_mean']:.0f}"])
    return markdown_table(
        ["variant", "params", "MACs/image", "seeds", "plateaued", "epochs",
         "train loss (eval mode)", "train top-1", "best val top-1", "train - val top-1",
         "wall s / run"], rows)


def comparison_line(results: Results, a: str, b: str, metric: str, percent: bool = True) -> str:
    d = results.compare(a, b, metric)
    scale, unit = (100.0, " points") if percent else (1.0, "")
    verdict = "different" if d.significant else "no difference shown"
    return f"{a} - {b}, {metric}: {d.describe(scale, unit)}: {verdict}"


def _interp_band(runs: Sequence[Run], split: str, key: str, scale: float = 1.0):
    """Epochs, mean and std of ``split``'s ``key`` over the runs at each logged step (runs that
    stopped earlier drop out of the later points)."""
    by_step: Dict[int, List[float]] = {}
    spe = runs[0].steps_per_epoch
    for r in runs:
        for rec in r.split(split):
            if key in rec and rec["step"] > 0 and math.isfinite(float(rec[key])):
                by_step.setdefault(int(rec["step"]), []).append(scale * float(rec[key]))
    steps = sorted(by_step)
    mean = np.array([np.mean(by_step[s]) for s in steps])
    std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
    return np.array(steps) / spe, mean, std


def new_figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8):
    """A bare matplotlib Figure on the Agg canvas (headless; leaves pyplot's state alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=90)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


def plot_curve_axes(axes, results: Results) -> None:
    """Training loss (eval mode, probe), validation loss and validation top-1 against epochs:
    mean over seeds with a +-1 std band; a triangle where each run reached its plateau, a cross
    where a plateau lowered its learning rate."""
    panels = (("train_probe", "loss", 1.0, "training loss (eval mode, training images)"),
              ("eval", "loss", 1.0, "validation loss"),
              ("eval", "top1", 100.0, "validation top-1 (%)"))
    for i, label in enumerate(results.labels):
        runs = results.of(label)
        color = f"C{i % 10}"
        for ax, (split, key, scale, _) in zip(axes, panels):
            x, m, s = _interp_band(runs, split, key, scale)
            if not len(x):
                continue
            ax.plot(x, m, color=color, lw=1.4, marker="o", ms=2.5,
                    label=f"{label} (n={len(runs)})")
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.2, lw=0)
        for r in runs:
            top1 = {int(e["step"]): 100 * float(e["top1"]) for e in r.split("eval")}
            if r.plateaued:
                axes[2].plot(r.epochs, top1[max(top1)], marker="v", ms=6, color=color, ls="none")
            for d in r.split(LR_DROP):  # the plateau that lowered the learning rate
                if int(d["step"]) in top1:
                    axes[2].plot(int(d["step"]) / r.steps_per_epoch, top1[int(d["step"])],
                                 marker="x", ms=6, color=color, ls="none")
    for ax, (_, _, _, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax in axes[:2]:  # log: early batch-norm statistics can make one loss 10x the others
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    drops = any(r.split(LR_DROP) for r in results.runs)
    axes[2].legend(fontsize=7, title="mean ± std over seeds; ▼ plateau" +
                   (f"; × lr × {results.exp.plateau.factor:g}" if drops else ""), title_fontsize=7)


def plot_curves(path: str, results: Results, extra_panels: int = 0):
    fig, axes = new_figure(3 + extra_panels)
    plot_curve_axes(axes[:3], results)
    fig.suptitle(results.exp.title, fontsize=11)
    return fig, axes[3:], path


def save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def setup_lines(results: Results) -> List[str]:
    import jax

    c = results.shared_config()  # the recipe with the run's --config.* (e.g. num_epochs)
    first = results.runs[0] if results.runs else None
    lines = [
        f"- data: `{c.dataset}` at {c.image_size} px, augmentation "
        f"`{c.augment or 'dataset default'}`",
        f"- training (every variant; `cnn_jax/configs/default.py` with these fields): "
        f"{c.optimizer} peak lr {c.learning_rate:g}, {c.lr_schedule} schedule with "
        f"{c.warmup_epochs:g} warmup epochs, batch {c.batch_size}, weight decay "
        f"{c.weight_decay:g}, gradient clipping {c.grad_clip_norm:g}, at most "
        f"{c.num_epochs:g} epochs, {first.steps_per_epoch if first else '?'} steps per epoch; "
        f"evaluation every {c.eval_every_steps} steps",
        f"- stopping: {results.exp.plateau.describe()}"
        + ("; otherwise the epoch budget" if results.exp.plateau.stops else ""),
        f"- training loss and accuracy are of the first "
        f"{results.extra.get('probe_size', results.exp.probe_size)} training images "
        f"in evaluation mode (no augmentation, dropout or batch statistics), at every evaluation",
        f"- seeds: {', '.join(str(s) for s in sorted({r.seed for r in results.runs}))} "
        "(the seed sets initialization, data order and dropout)",
        "- 'different': the 95% confidence interval of the difference of means (Welch's t) "
        "excludes 0",
        f"- machine: JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} "
        f"device(s), {os.cpu_count()} CPU cores, shared with other jobs)",
        f"- trained on: {trained_on(results.runs)} (XLA compiles for the processor it runs on, so "
        "a run's float32 rounding, and after a few thousand steps its numbers, are those of that "
        "kind of processor: on another kind the same command draws the rounding again, like a "
        "seed)",
    ]
    return lines


def trained_on(runs: Sequence[Run]) -> str:
    """What the runs trained on, with how many runs each where that differs."""
    counts: Dict[str, int] = {}
    for run in runs:
        for device in run.devices or ("not recorded (trained before 2026-12-06)",):
            counts[device] = counts.get(device, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{device} ({n} run(s))" for device, n in counts.items())


def write_results(results: Results, out: str, command: str, seconds: float,
                  partial: bool = False, jobs: int = 0) -> Dict[str, str]:
    """runs.csv, summary.csv, curves.csv, <name>.png and README.md in ``out`` (``partial``: an
    intermediate write while later seeds are still to run; ``jobs``: how many single-core
    workers trained the runs, 0 for this process)."""
    exp = results.exp
    os.makedirs(out, exist_ok=True)
    paths = {"runs": write_csv(os.path.join(out, "runs.csv"),
                               [run_row(r) for r in results.runs], RUN_COLUMNS)}
    summary = summary_rows(results)
    paths["summary"] = write_csv(os.path.join(out, "summary.csv"), summary)
    curve_rows = []
    for r in results.runs:
        for rec in r.records:
            if rec.get("split") in ("train", "eval", "train_probe"):
                row = {k: rec.get(k, "") for k in CURVE_COLUMNS}
                row.update(variant=r.variant, seed=r.seed, epoch=rec["step"] / r.steps_per_epoch)
                curve_rows.append(row)
    paths["curves"] = write_csv(os.path.join(out, "curves.csv"), curve_rows, CURVE_COLUMNS)
    extra_tables = exp.analyse(results, out) if exp.analyse else []
    fig, _, png = plot_curves(os.path.join(out, f"{exp.name}.png"), results)
    paths["plot"] = save(fig, png)
    images = sorted(f for f in os.listdir(out) if f.endswith(".png"))

    parts = [f"# {exp.title}", ""]
    if partial:
        parts += [f"**Partial results: {len(results.runs)} runs so far; the command below "
                  "resumes the rest.**", ""]
    parts += [exp.intro.strip(), "", "## Hypotheses (written before the runs)", ""]
    for h in exp.hypotheses:
        parts += [f"**{h.name}.** {h.claim} Prediction here: {h.prediction}", ""]
    parts += ["## Command", "", "From the repository root (a re-run resumes unfinished runs and "
              "reads finished ones):", "", "```bash", command or f"python -m experiments.run "
              f"{exp.name}", "```", "",
              f"Training time of these {len(results.runs)} runs: "
              f"{sum(r.wall_seconds for r in results.runs) / 60:.1f} min (sum over runs"
              + (f", each on one CPU core, {jobs} at a time; the last invocation took "
                 f"{seconds / 60:.1f} min for every experiment it ran, reading runs that had "
                 "finished)." if jobs else
                 f"; the last invocation took {seconds / 60:.1f} min, reading runs that had "
                 "finished)."),
              "", "## Setup", "",
              *setup_lines(results), "", "## Results", "", summary_table(results), ""]
    for heading, table in extra_tables:
        parts += [f"**{heading}**", "", table, ""]
    parts += [f"![{os.path.splitext(i)[0]}]({i})" for i in images] + [""]
    parts += ["## Outcomes", ""]
    for h in exp.hypotheses:
        try:
            o = h.test(results)
        except (KeyError, ValueError, ZeroDivisionError) as e:  # e.g. a variant not run
            o = Outcome("inconclusive", f"not enough runs to test ({type(e).__name__}: {e})")
        parts += [f"- **{h.name}: {o.verdict}.** {o.why}"]
        if o.verdict != "confirmed" and h.paper_command:
            parts += [f"  The paper's setting: `{h.paper_command}`"]
    parts += [""]
    if exp.caveats:
        parts += ["## What these runs do not show", ""] + [f"- {c}" for c in exp.caveats] + [""]
    paths["markdown"] = os.path.join(out, "README.md")
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {', '.join(sorted(os.path.relpath(p) for p in paths.values()))}",
          file=sys.stderr, flush=True)
    return paths


def command_line(argv: Sequence[str]) -> str:
    return " ".join(["python", "-m", "experiments.run", *map(shlex.quote, argv)])
