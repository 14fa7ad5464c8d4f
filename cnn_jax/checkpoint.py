"""Orbax checkpoints in ``<workdir>/checkpoints``: the last K steps plus the best by val top-1.

Each step directory holds two items: ``state`` (the unreplicated TrainState as host arrays, so a
checkpoint does not depend on the device count) and ``meta`` (JSON: architecture, dataset and the
whole config), which lets a run refuse a workdir that belongs to another architecture.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = "top1"


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
                 async_save: bool = True, read_only: bool = False):
        policies = [ocm.LatestN(n=max(1, int(max_to_keep)))]
        if keep_best:
            policies.append(ocm.BestN(get_metric_fn=_best_metric, n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric, best_mode="max",
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save and not read_only,
            read_only=read_only, create=not read_only)
        self.directory = checkpoint_dir(workdir)
        # The two items and their handlers (Orbax's replacement of the deprecated item_names).
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, kinds in (("state", (ocp.args.StandardSave, ocp.args.StandardRestore,
                                       ocp.args.PyTreeRestore)),  # restore_subtree's partial read
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

    def restore_subtree(self, target: Dict[str, Any], step: int) -> Dict[str, Any]:
        """Only the ``state`` entries named in ``target`` (e.g. params and batch_stats, for
        inference): the optimizer state is not read."""
        restored = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))
        return dict(restored["state"])

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _best_metric(metrics: Dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


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
