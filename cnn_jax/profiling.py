"""Where a compiled step spends its time: per-XLA-op totals read from a ``jax.profiler`` trace.

    python -m cnn_jax.benchmark --arch=densenet121 --batch_size=16 --profile
    python -m cnn_jax.benchmark --suite=gpu --profile_steps=3 ...

Reads the trace's XSpace with ``jax.profiler.ProfileData`` (no TensorBoard or xprof needed, so it
runs on the accelerator machine too). On a GPU or TPU the ops are the device planes' events
(``/device:...``: their "XLA Ops" line where there is one, else the kernels, each tagged with its
``hlo_op``), on the CPU the host events that carry an ``hlo_op`` stat (XLA's thunks on every
thread, each counted for its span: an op whose library call runs on several threads counts its
wall time once, two ops running at once on two threads both count). Each op's time is its own
(exclusive): an event nested in another on the same line is taken out of its parent's. Ops are
grouped into kinds by their HLO names without the numeric suffix (``convolution.21`` ->
``convolution``, ``loop_add_fusion.3`` -> ``loop_add_fusion``).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Sequence, Tuple

_SUFFIX = re.compile(r"(\.\d+)+$")


def kind(op: str) -> str:
    """An HLO op's kind: its name without the numeric suffix XLA adds to make names unique."""
    return _SUFFIX.sub("", op) or op


def _exclusive(events: Sequence[Tuple[str, int, int]]) -> Dict[str, List[int]]:
    """``{name: [exclusive ns, count]}`` of ``(name, start_ns, end_ns)`` events of one line:
    an event inside another (a thunk of a while loop's body, say) is taken out of the outer's."""
    totals: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    stack: List[List[Any]] = []  # [name, start, end, the children's ns]

    def close():
        name, start, end, children = stack.pop()
        totals[name][0] += max(0, end - start - children)
        totals[name][1] += 1
        if stack:
            stack[-1][3] += end - start

    for name, start, end in sorted(events, key=lambda e: (e[1], -e[2])):
        while stack and stack[-1][2] <= start:
            close()
        stack.append([name, start, end, 0])
    while stack:
        close()
    return totals


def op_times(profile) -> Dict[str, Tuple[float, int]]:
    """``{op: (seconds, calls)}`` of a ``jax.profiler.ProfileData`` (or an ``.xplane.pb`` path)."""
    return read_ops(profile)[0]


def read_ops(profile) -> Tuple[Dict[str, Tuple[float, int]], str]:
    """:func:`op_times` and where they were read: ``"device XLA Ops"``, ``"device kernels"`` or
    ``"host thunks"`` (on a GPU the last would be launch times, not the device's: a trace
    without device ops says so instead of passing for one)."""
    import jax

    if isinstance(profile, (str, os.PathLike)):
        profile = jax.profiler.ProfileData.from_file(os.fspath(profile))
    device = [line for plane in profile.planes if plane.name.startswith("/device:")
              for line in plane.lines]
    host = [line for plane in profile.planes if plane.name.startswith("/host:")
            for line in plane.lines if line.name != "python"]
    # A device plane's "XLA Ops" line (where the trace has one) holds one event per op; its other
    # lines hold the kernels, tagged with their op. Without device ops: the CPU's thunks.
    xla_ops = [line for line in device if line.name == "XLA Ops"]

    def events(line, name_from_event: bool):
        out = []
        for e in line.events:
            stats = dict(e.stats)
            name = stats.get("hlo_op") or (e.name if name_from_event else None)
            if name:
                out.append((str(name), int(e.start_ns), int(e.end_ns)))
        return out

    if xla_ops:
        per_line, source = [events(line, True) for line in xla_ops], "device XLA Ops"
    else:
        per_line, source = [events(line, False) for line in device], "device kernels"
        if not any(per_line):
            per_line, source = [events(line, False) for line in host], "host thunks"
    totals: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
    for line_events in per_line:
        for name, (ns, n) in _exclusive(line_events).items():
            totals[name][0] += ns
            totals[name][1] += n
    return {name: (ns / 1e9, n) for name, (ns, n) in totals.items()}, source


def summarize(times: Dict[str, Tuple[float, int]], steps: int, top: int = 15,
              source: str = "") -> Dict[str, Any]:
    """Per step: total op time, the kinds and the ``top`` ops by time, each with its share;
    ``source``: where the times were read (:func:`read_ops`)."""
    total = sum(s for s, _ in times.values())
    by_kind: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, (s, n) in times.items():
        by_kind[kind(name)][0] += s
        by_kind[kind(name)][1] += n

    def share(s):
        return s / total if total else 0.0

    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1][0])
    ops = sorted(times.items(), key=lambda kv: -kv[1][0])
    return {"steps": steps, "source": source, "op_ms_per_step": 1e3 * total / steps,
            "ops_counted": len(times),
            "kinds": [{"kind": k, "ms_per_step": 1e3 * s / steps, "calls_per_step": n / steps,
                       "share": share(s)} for k, (s, n) in kinds[:top]],
            "top_ops": [{"op": o, "kind": kind(o), "ms_per_step": 1e3 * s / steps,
                         "calls_per_step": n / steps, "share": share(s)}
                        for o, (s, n) in ops[:top]]}


def markdown(summary: Dict[str, Any], title: str = "", ops: str = "XLA ops") -> str:
    """Two tables: the op kinds and the single ops with the most time per step; ``ops``: what
    was traced (a summary of torch's ops says so)."""
    head = (f"{title}: " if title else "") + (
        f"{summary['op_ms_per_step']:.2f} ms of {ops} per step ({summary['steps']} traced "
        f"steps, {summary['ops_counted']} ops, read from the {summary.get('source') or 'trace'};"
        f" ops running at once on two threads both count)")
    lines = [head, "", "| op kind | ms/step | calls/step | share |", "|---|---|---|---|"]
    lines += [f"| {k['kind']} | {k['ms_per_step']:.2f} | {k['calls_per_step']:g} | "
              f"{100 * k['share']:.1f}% |" for k in summary["kinds"]]
    lines += ["", "| op | ms/step | share |", "|---|---|---|"]
    lines += [f"| {o['op']} | {o['ms_per_step']:.2f} | {100 * o['share']:.1f}% |"
              for o in summary["top_ops"]]
    return "\n".join(lines)


def run_steps(step: Callable, args: tuple, n: int, carry: bool = False) -> tuple:
    """``n`` back-to-back calls of a compiled ``step`` with one sync at the end (asynchronous
    dispatch keeps the device busy, as in training); ``carry``: feed the first output back as the
    first argument (a train step donates its state). Returns the arguments of the next call."""
    import jax

    out = None
    for _ in range(n):
        out = step(*args)
        if carry:
            args = (out[0],) + tuple(args[1:])
    jax.block_until_ready(out)
    return args


def profile_steps(step: Callable, args: tuple, steps: int, carry: bool = False,
                  logdir: str = "") -> Tuple[Dict[str, Any], tuple]:
    """Trace ``steps`` calls of a compiled ``step`` (after the caller's warm-up) and summarize
    its ops (``carry`` as in :func:`run_steps`). Returns ``(summary, args)``; the trace goes to a
    temporary folder unless ``logdir`` is given."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        where = logdir or tmp
        with jax.profiler.trace(where):
            args = run_steps(step, args, steps, carry)
        paths = glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {where}")
        times, source = read_ops(max(paths, key=os.path.getmtime))
        summary = summarize(times, steps, source=source)
    return summary, args
