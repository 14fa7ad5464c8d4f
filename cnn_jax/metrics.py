"""What a training run reports: a tqdm progress bar, clu metric writers and ``metrics.jsonl``.

Only process 0 writes files and draws the bar; other processes log to their own absl logs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Mapping, Optional

from tqdm.auto import tqdm

from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Scalars to TensorBoard (clu ``create_default_writer``) and one JSON object per line."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._writer = metric_writers.create_default_writer(
            workdir if (enabled and tensorboard) else None, just_logging=not enabled,
            asynchronous=True)
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)

    def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        """Write ``{split}/{name}`` scalars at ``step`` (e.g. split ``train`` or ``eval``)."""
        values = {k: float(v) for k, v in scalars.items()}
        if self._writer is not None:
            self._writer.write_scalars(int(step), {f"{split}/{k}": v for k, v in values.items()})
        if self._file is not None:
            record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
            self._file.write(json.dumps(record) + "\n")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self._writer is not None and self.enabled:
            flat = {k: v for k, v in _flatten(hparams).items()
                    if isinstance(v, (int, float, str, bool))}
            self._writer.write_hparams(flat)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def discard_after(workdir: str, step: int) -> None:
    """Drop what a run logged after ``step`` (the step a resume starts from) and repeated records.

    A run killed after its last checkpoint logged steps that the resumed run logs again; without
    this, ``metrics.jsonl`` and TensorBoard would show them twice. ``metrics.jsonl`` keeps one
    record per (split, step), the last; the TensorBoard event files keep the events up to
    ``step``. Each file is rewritten next to itself and renamed over it, so a crash leaves either
    the old or the new file.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
        records: Dict[Any, str] = {}
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by the kill
                    continue
                if int(record.get("step", 0)) <= step:
                    records.pop((record.get("split"), record.get("step")), None)
                    records[(record.get("split"), record.get("step"))] = line.rstrip("\n")
        _replace(path, "".join(line + "\n" for line in records.values()).encode())
    for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
        if name.startswith("events.out.tfevents"):
            _truncate_events(os.path.join(workdir, name), step)


def remove_records(workdir: str, drop: Callable[[Dict[str, Any]], bool]) -> None:
    """Rewrite ``metrics.jsonl`` without the records for which ``drop`` is true (e.g. a stop
    that no longer holds). TensorBoard's event files keep them: scalars there are append-only."""
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
        kept = [json.dumps(r) + "\n" for r in read_metrics(workdir) if not drop(r)]
        _replace(path, "".join(kept).encode())


def _replace(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _truncate_events(path: str, step: int) -> None:
    """Keep the events of a TensorBoard event file up to ``step`` (and none twice)."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    kept, seen, changed = [], set(), False
    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = event_pb2.Event.FromString(record)
            tags = tuple(v.tag for v in event.summary.value)
            key = (event.step, tags)
            if event.HasField("summary") and (event.step > step or key in seen):
                changed = True
                continue
            seen.add(key)
            kept.append(record)
    except tf.errors.DataLossError:  # the last record was cut short by the kill
        changed = True
    if not changed:
        return
    # Not "*tfevents*": TensorBoard must not read the half-written copy.
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path).replace(
        "tfevents", "rewrite"))
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in kept:
            writer.write(record)
    os.replace(tmp, path)


def read_metrics(workdir: str, split: Optional[str] = None) -> list:
    """The records of ``<workdir>/metrics.jsonl`` (optionally of one split), oldest first."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


class ProgressBar:
    """tqdm over training steps: loss, accuracy and images/second as postfix, ETA from tqdm."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not enabled, file=sys.stderr, smoothing=0.1, mininterval=0.5)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_metrics(self, loss: float, accuracy: float, images_per_sec: float) -> None:
        self._bar.set_postfix_str(
            f"loss={loss:.4f} acc={accuracy:.3f} img/s={images_per_sec:,.0f}", refresh=False)

    def write(self, message: str) -> None:
        """Print a line above the bar (or plainly when the bar is disabled)."""
        if self._bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def summary_line(arch: str, dataset: str, step: int, seconds: float,
                 eval_metrics: Optional[Mapping[str, float]], best: Optional[Mapping[str, Any]],
                 workdir: str, ema_metrics: Optional[Mapping[str, float]] = None) -> str:
    """The final one-line summary of a run."""
    parts = [f"{arch} on {dataset}: {step} steps in {format_duration(seconds)}"]
    if eval_metrics:
        parts.append(f"val top-1 {100 * eval_metrics['top1']:.2f}%, "
                     f"top-5 {100 * eval_metrics['top5']:.2f}%, loss {eval_metrics['loss']:.4f}")
    if ema_metrics:
        parts.append(f"EMA top-1 {100 * ema_metrics['top1']:.2f}%")
    if best:
        parts.append(f"best top-1 {100 * best['top1']:.2f}% at step {best['step']}")
    parts.append(f"workdir {workdir}")
    return "; ".join(parts)
