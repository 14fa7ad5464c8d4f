"""Orbax checkpoints in ``<workdir>/checkpoints``: the last K steps plus the best by val top-1.

Each step directory holds two items: ``state`` (the unreplicated TrainState as host arrays, so a
checkpoint does not depend on the device count) and ``meta`` (JSON: architecture, dataset and the
whole config), which lets a run refuse a workdir that belongs to another architecture.

Resuming (:func:`restore_for_training`) reads the newest checkpoint that can be read: an
unreadable one (a crash mid-write) is moved to ``<workdir>/checkpoints.damaged/`` (never deleted)
and the one before it is used. A checkpoint whose model (parameter or BN-statistic shapes)
differs from the run's is refused with a one-line error; one whose optimizer state differs (an
optimizer change such as ``--config.grad_clip_norm`` or ``--config.optimizer``) gives its
parameters, BN statistics, EMA and step, and the optimizer state starts afresh, with a notice.
:func:`load_variables` returns the raw or EMA variables of a workdir's checkpoint, for
evaluation, prediction and export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = "top1"
BEST_METRICS = ("top1", "ema_top1")  # raw weights' or EMA weights' validation top-1
DAMAGED_DIR = "checkpoints.damaged"


# Orbax warnings about deliberate choices: saves between evaluations carry no metrics, and
# evaluation opens the manager read-only.
_EXPECTED_WARNINGS = ("did not provide metrics", "read_only=True", "Given directory is read only")


class _ExpectedWarningsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(w in message for w in _EXPECTED_WARNINGS)


logging.getLogger("absl").addFilter(_ExpectedWarningsFilter())


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of another architecture (or dataset/class count)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with the keep policy of the training loop.

    Keeps the ``max_to_keep`` most recent checkpoints plus the one with the highest validation
    top-1 (``metrics={'top1': ...}`` given to :meth:`save`), via Orbax's preservation policies.
    """

    def __init__(self, workdir: str, max_to_keep: int = 3, keep_best: bool = True,
                 async_save: bool = True, read_only: bool = False,
                 best_metric: str = BEST_METRIC):
        if best_metric not in BEST_METRICS:
            raise ValueError(f"unknown best_metric {best_metric!r}; choose one of "
                             f"{', '.join(BEST_METRICS)}")
        best_fn = lambda metrics: _best_metric(metrics, best_metric)  # noqa: E731
        policies = [ocm.LatestN(n=max(1, int(max_to_keep)))]
        if keep_best:
            policies.append(ocm.BestN(get_metric_fn=best_fn, n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode="max",
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save and not read_only,
            read_only=read_only, create=not read_only)
        self.workdir = os.path.abspath(workdir)
        self.directory = checkpoint_dir(workdir)
        # (step, error, where it was moved): checkpoints whose JSON files do not parse, which
        # Orbax's manager cannot even open; the writable manager moves them aside first.
        self.damaged: List[Tuple[int, str, str]] = []
        for step, error in _unparsable_steps(self.directory):
            if read_only:
                raise ValueError(f"checkpoint {step} in {self.directory} is unreadable ({error}); "
                                 "re-run the training command once (it moves the checkpoint "
                                 f"aside to {DAMAGED_DIR}/)")
            self.damaged.append((step, error, self._move(step)))
        # The two items and their handlers (Orbax's replacement of the deprecated item_names).
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, kinds in (("state", (ocp.args.StandardSave, ocp.args.StandardRestore,
                                       ocp.args.PyTreeRestore)),  # PyTree: partial reads
                            ("meta", (ocp.args.JsonSave, ocp.args.JsonRestore))):
            for kind in kinds:
                registry.add(item, kind)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             handler_registry=registry)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def read_meta(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """The JSON metadata of ``step`` (default: latest); None when the workdir has none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def save(self, step: int, state: Any, meta: Dict[str, Any],
             metrics: Optional[Dict[str, float]] = None) -> bool:
        """Save (asynchronously unless disabled) host arrays of ``state`` at ``step``."""
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self.manager.save(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)),
            metrics=metrics)

    def restore(self, target: Any, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any], int]:
        """Restore into the structure (and dtypes) of ``target``: (state, meta, step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"]), int(step)

    def restore_raw(self, step: int) -> Dict[str, Any]:
        """The ``state`` item of ``step`` as saved (nested dicts/lists of numpy arrays), no target.

        Namedtuples (optax states) come back as dicts by field name, tuples as lists.
        """
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
        return restored["state"]

    def move_aside(self, step: int) -> str:
        """Move the directory of ``step`` to ``<workdir>/checkpoints.damaged/`` (kept)."""
        dest = self._move(step)
        self.manager.reload()
        return dest

    def _move(self, step: int) -> str:
        src = os.path.join(self.directory, str(int(step)))
        dest_root = os.path.join(self.workdir, DAMAGED_DIR)
        dest = os.path.join(dest_root, str(int(step)))
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(dest_root, f"{int(step)}.{n}")
            n += 1
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(dest_root, exist_ok=True)
            shutil.move(src, dest)
        return dest

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_JSON_FILES = ("_CHECKPOINT_METADATA", os.path.join("metrics", "metrics"),
               os.path.join("meta", "metadata"), os.path.join("state", "_METADATA"))


def _unparsable_steps(directory: str) -> List[Tuple[int, str]]:
    """Step directories with a JSON file that does not parse (cut short by a crash)."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.isdigit():
            continue
        for rel in _JSON_FILES:
            path = os.path.join(directory, name, rel)
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    json.load(f)
            except (ValueError, OSError) as e:
                out.append((int(name), f"{rel}: {_first_line(e)}"))
                break
    return out


def _best_metric(metrics: Dict[str, Any], name: str = BEST_METRIC) -> float:
    return float(metrics[name])


def check_compatible(meta: Optional[Dict[str, Any]], expected: Dict[str, Any], directory: str
                     ) -> None:
    """Raise :class:`CheckpointMismatchError` if a checkpoint's meta disagrees with this run."""
    if not meta:
        return
    for key in ("arch", "dataset", "num_classes"):
        have, want = meta.get(key), expected.get(key)
        if have is not None and want is not None and have != want:
            raise CheckpointMismatchError(
                f"{directory} holds a checkpoint of {key}={have!r}, not {want!r}; "
                f"pass another --workdir (or delete that one to start over)")


def check_workdir(checkpointer: Checkpointer, expected: Dict[str, Any]) -> None:
    """:func:`check_compatible` against the newest checkpoint whose meta reads, before the run
    builds (and compiles) its model: a workdir of another run is refused at once.
    :func:`restore_for_training` checks again once damaged checkpoints are moved aside."""
    for step in sorted(checkpointer.all_steps(), reverse=True):
        try:
            meta = checkpointer.read_meta(step)
        except Exception:  # noqa: BLE001 -- unreadable: restore_for_training moves it aside
            continue
        check_compatible(meta, expected, checkpointer.directory)
        return


# ----------------------------------------------------------------------------- resuming


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _leaves_by_path(tree: Any) -> Dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): leaf for path, leaf in leaves}


def fit_tree(target: Any, raw: Any) -> Tuple[Any, List[str]]:
    """``raw`` (as :meth:`Checkpointer.restore_raw` returns it) in the structure and dtypes of
    ``target``; the second value lists what differs (empty when it fits)."""
    have = _leaves_by_path(raw)
    want_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    problems, leaves = [], []
    for path, leaf in want_leaves:
        key = _path_str(path)
        value = have.pop(key, None)
        shape = tuple(np.shape(leaf))
        if value is None:
            problems.append(f"{key} {shape} is not in the checkpoint")
            leaves.append(leaf)
        elif tuple(np.shape(value)) != shape:
            problems.append(f"{key} is {tuple(np.shape(value))} in the checkpoint, {shape} here")
            leaves.append(leaf)
        else:
            leaves.append(np.asarray(value).astype(np.asarray(leaf).dtype))
    problems += [f"{key} {tuple(np.shape(v))} is in the checkpoint only" for key, v in have.items()
                 if v is not None]
    return jax.tree_util.tree_unflatten(treedef, leaves), problems


def _summarize(problems: List[str], limit: int = 2) -> str:
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def config_changes(old: Optional[Dict[str, Any]], new: Dict[str, Any],
                   keys: Optional[Tuple[str, ...]] = None) -> List[str]:
    """``key: old -> new`` for the config fields (of ``keys``, default all) that differ."""
    if not old:
        return []
    out = []
    for key in sorted(set(old) | set(new)):
        if keys is not None and key not in keys:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b and not (isinstance(a, dict) or isinstance(b, dict)):
            out.append(f"{key} {a!r} -> {b!r}")
    return out


MODEL_KEYS = ("arch", "model_kwargs", "model", "image_size", "dtype")
OPTIMIZER_KEYS = ("optimizer", "momentum", "weight_decay", "weight_decay_skip_bn_bias",
                  "grad_clip_norm", "adam_b1", "adam_b2", "adam_eps", "lars_trust_coefficient",
                  "grad_accum_steps", "learning_rate", "lr_schedule")


def state_from_raw(target: Any, raw: Dict[str, Any], meta: Dict[str, Any],
                   expected_meta: Dict[str, Any], notice: Callable[[str], None], where: str):
    """The training state of a raw checkpoint, fitted to the fresh ``target`` state.

    Model mismatch: :class:`CheckpointMismatchError`. Optimizer mismatch: ``target``'s fresh
    optimizer state, with a notice. A missing EMA starts at the restored weights; a missing loss
    scale starts afresh.
    """
    old_cfg, new_cfg = (meta or {}).get("config") or {}, expected_meta.get("config") or {}
    model_problems = []
    fitted = {}
    for field in ("params", "batch_stats"):
        fitted[field], problems = fit_tree(getattr(target, field), raw.get(field))
        model_problems += [f"{field}/{p}" for p in problems]
    if model_problems:
        changes = config_changes(old_cfg, new_cfg, MODEL_KEYS)
        what = f" ({', '.join(changes)})" if changes else ""
        raise CheckpointMismatchError(
            f"the model in {where} differs from this run's{what}: {_summarize(model_problems)}; "
            "run with the model options it was trained with, or pass another --workdir")
    fitted["step"] = np.asarray(raw["step"]).astype(np.asarray(target.step).dtype)
    fitted["rng"] = np.asarray(raw["rng"]).astype(np.asarray(target.rng).dtype)

    opt_state, problems = fit_tree(target.opt_state, raw.get("opt_state"))
    if problems:
        changes = config_changes(old_cfg, new_cfg, OPTIMIZER_KEYS)
        what = ", ".join(changes) if changes else _summarize(problems, 1)
        notice(f"the optimizer differs from the checkpoint's ({what}): restored the parameters, "
               f"BN statistics and step {int(fitted['step'])} from {where}; the optimizer state "
               "starts afresh")
        opt_state = target.opt_state
    fitted["opt_state"] = opt_state

    if target.ema_params is not None:
        ema, p1 = fit_tree(target.ema_params, raw.get("ema_params"))
        ema_bs, p2 = fit_tree(target.ema_batch_stats, raw.get("ema_batch_stats"))
        if p1 or p2:
            notice(f"{where} has no EMA of the weights: the EMA starts at its weights")
            ema, ema_bs = fitted["params"], fitted["batch_stats"]
        fitted["ema_params"], fitted["ema_batch_stats"] = ema, ema_bs
    if target.dynamic_scale is not None:
        scale, problems = fit_tree(target.dynamic_scale, raw.get("dynamic_scale"))
        fitted["dynamic_scale"] = target.dynamic_scale if problems else scale
    return target.replace(**fitted)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def restore_for_training(checkpointer: Checkpointer, target: Any, expected_meta: Dict[str, Any],
                         notice: Callable[[str], None]) -> Tuple[Any, Optional[int]]:
    """The state of the newest readable checkpoint (None, None when there is none).

    Unreadable checkpoints are moved aside, each reported in one line; a checkpoint of another
    architecture/dataset or model raises :class:`CheckpointMismatchError`.
    """
    damaged = list(checkpointer.damaged)
    for step in sorted(checkpointer.all_steps(), reverse=True):
        try:
            meta = checkpointer.read_meta(step)
            raw = checkpointer.restore_raw(step)
        except Exception as e:  # noqa: BLE001 -- any read failure means a damaged checkpoint
            damaged.append((step, _first_line(e), checkpointer.move_aside(step)))
            continue
        where = f"{checkpointer.directory} (step {step})"
        check_compatible(meta, expected_meta, checkpointer.directory)
        state = state_from_raw(target, raw, meta, expected_meta, notice, where)
        for bad, error, dest in damaged:
            notice(f"checkpoint {bad} in {checkpointer.directory} is unreadable ({error}); moved "
                   f"it to {dest} and resumed from step {step}")
        return state, step
    for bad, error, dest in damaged:
        notice(f"checkpoint {bad} in {checkpointer.directory} is unreadable ({error}); moved it "
               f"to {dest}; no readable checkpoint is left, starting from step 0")
    return None, None


def load_variables(workdir: str, step: Union[None, int, str] = None, ema: bool = False
                   ) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
    """``({"params", "batch_stats"}, meta, step)`` of a workdir's checkpoint, for inference.

    ``step``: an int, ``"best"`` (the best by the run's best-checkpoint metric) or None/``"latest"``
    (the newest readable). ``ema=True`` returns the EMA weights and BN statistics
    (``--config.ema_decay``); a checkpoint without them raises a one-line ValueError.
    """
    checkpointer = Checkpointer(workdir, read_only=True, async_save=False)
    try:
        steps = sorted(checkpointer.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train one with "
                                    f"`python -m cnn_jax.train --workdir={workdir}`")
        if step == "best":
            best_metric = ((checkpointer.read_meta(steps[0]) or {}).get("config") or {}).get(
                "best_metric", BEST_METRIC)
            if best_metric != BEST_METRIC and best_metric in BEST_METRICS:  # the run's choice
                checkpointer.close()
                checkpointer = Checkpointer(workdir, read_only=True, async_save=False,
                                            best_metric=best_metric)
            best = checkpointer.best_step()
            candidates = [best if best is not None else steps[0]]
        elif step is None or step == "latest":
            candidates = steps
        else:
            if int(step) not in steps:
                raise ValueError(f"no checkpoint of step {step} in {checkpointer.directory}; "
                                 f"it has {', '.join(map(str, sorted(steps)))}")
            candidates = [int(step)]
        error = None
        for s in candidates:
            try:
                meta = checkpointer.read_meta(s)
                raw = checkpointer.restore_raw(s)
            except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: try the previous one
                error = e
                continue
            if ema:
                if raw.get("ema_params") is None:
                    raise ValueError(f"{checkpointer.directory} (step {s}) has no EMA weights: it "
                                     "was trained without --config.ema_decay; leave out the EMA "
                                     "option to use its raw weights")
                variables = {"params": raw["ema_params"],
                             "batch_stats": raw.get("ema_batch_stats") or {}}
            else:
                variables = {"params": raw["params"], "batch_stats": raw.get("batch_stats") or {}}
            if not variables["batch_stats"]:
                variables = {"params": variables["params"]}
            return variables, dict(meta or {}), int(s)
        raise ValueError(f"no readable checkpoint in {checkpointer.directory} "
                         f"({_first_line(error)})")
    finally:
        checkpointer.close()
