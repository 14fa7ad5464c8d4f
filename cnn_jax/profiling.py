"""Where a compiled step spends its time: per-XLA-op totals read from a ``jax.profiler`` trace.

    python -m cnn_jax.benchmark --arch=densenet121 --batch_size=16 --profile
    python -m cnn_jax.benchmark --suite=gpu --profile_steps=3 ...

Reads the trace's XSpace with ``jax.profiler.ProfileData`` (no TensorBoard or xprof needed, so it
runs on the accelerator machine too). On a GPU or TPU the ops are the device planes' events
(``/device:...``: their "XLA Ops" line where there is one, else the kernels, each tagged with its
``hlo_op``), on the CPU the host events that carry an ``hlo_op`` stat (XLA's thunks on every
thread). An op's time is its share of the wall time: each moment is split evenly among the
ops running then, so the ops' times add up to the traced steps' busy time (``op_ms_per_step``;
``idle_ms_per_step``: nothing running) and two ops running at once on two cores get half each.
An event nested in another on the same line (a thunk of a while loop's body) is taken out of its
parent's. On the CPU much of an op's work runs as tasks on XLA's thread pool, outside its own
event: an Eigen convolution or dot is traced as its launch only (a 25 ms convolution as
0.03 ms), a parallel loop's other half not at all. Each task (a ``ThreadpoolListener`` region of
the trace) counts for the op that scheduled it.
Ops are grouped into kinds by their HLO names without the numeric suffix (``convolution.21`` ->
``convolution``, ``loop_add_fusion.3`` -> ``loop_add_fusion``).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

_SUFFIX = re.compile(r"(\.\d+)+$")


def kind(op: str) -> str:
    """An HLO op's kind: its name without the numeric suffix XLA adds to make names unique."""
    return _SUFFIX.sub("", op) or op


# At equal times: ends before starts before the records of tasks scheduled then.
_ORDER = {"end": 0, "op": 1, "task": 1, "record": 2}


def _segments(lines: Sequence[Sequence[Tuple[str, int, int]]],
              tasks: Sequence[Sequence[Tuple[int, str, Any]]] = ()
              ) -> List[Tuple[str, int, int]]:
    """The ``(name, start_ns, end_ns)`` pieces of each line's innermost activity at each moment:
    its ``(name, start_ns, end_ns)`` events, an event inside another (a thunk of a while loop's
    body, say) taken out of the outer's, and the line's thread-pool tasks (``tasks``, per line:
    :func:`_pool_tasks`), each credited to the op that scheduled it (the ``record`` of its id,
    inside that op's event or inside another of its tasks). Tasks nobody owns (the executor's
    own) are left out."""
    points = []  # (ns, _ORDER, outer before inner, line, what, value)
    for line, events in enumerate(lines):
        for name, start, end in events:
            points += [(start, _ORDER["op"], -end, line, "op", name),
                       (end, _ORDER["end"], 0, line, "end", None)]
    for line, line_tasks in enumerate(tasks):
        points += [(ns, _ORDER[what], 0, line, what, value) for ns, what, value in line_tasks]
    points.sort(key=lambda p: p[:3])
    owners: Dict[Any, Any] = {}
    stacks: Dict[int, List[Any]] = collections.defaultdict(list)
    since: Dict[int, int] = {}
    pieces: List[Tuple[str, int, int]] = []
    for ns, _, _, line, what, value in points:
        stack = stacks[line]
        if stack and stack[-1] is not None and ns > since[line]:
            pieces.append((stack[-1], since[line], ns))
        since[line] = ns
        if what == "op":
            stack.append(value)
        elif what == "task":
            stack.append(owners.pop(value, None))
        elif what == "record":
            owners[value] = stack[-1] if stack else None
        elif stack:
            stack.pop()
    return pieces


def _shares(segments: Sequence[Tuple[str, int, int]]) -> Tuple[Dict[str, float], int]:
    """``({name: ns}, idle ns)``: each moment of ``segments``' span split evenly among the
    segments in flight then; idle: the moments with none."""
    points = sorted([(s, 1, i) for i, (_, s, _) in enumerate(segments)]
                    + [(e, 0, i) for i, (_, _, e) in enumerate(segments)])  # ends first
    shares: Dict[str, float] = collections.defaultdict(float)
    active: Dict[int, str] = {}
    idle, last = 0, None
    for t, starts, i in points:
        if last is not None and t > last:
            if active:
                each = (t - last) / len(active)
                for name in active.values():
                    shares[name] += each
            else:
                idle += t - last
        last = t
        if starts:
            active[i] = segments[i][0]
        else:
            active.pop(i, None)
    return shares, idle


_TASK_EVENTS = {"ThreadpoolListener::Record": ("record", "_p"),
                "ThreadpoolListener::StartRegion": ("task", "_c"),
                "ThreadpoolListener::StopRegion": ("end", None)}


def _pool_tasks(line) -> List[Tuple[int, str, Any]]:
    """One host line's thread-pool task events (XLA:CPU's ``ThreadpoolListener``), as
    ``(ns, what, id)``: a task scheduled (``record``), started (``task``) or stopped (``end``)."""
    out = []
    for e in line.events:
        what = _TASK_EVENTS.get(e.name)
        if what:
            out.append((int(e.start_ns), what[0], dict(e.stats).get(what[1]) if what[1] else None))
    return out


class Ops(NamedTuple):
    """:func:`read_ops`'s answer."""

    times: Dict[str, Tuple[float, int]]  # {op: (seconds, calls)}
    source: str
    idle_s: float  # inside the traced span, nothing running


def op_times(profile) -> Dict[str, Tuple[float, int]]:
    """``{op: (seconds, calls)}`` of a ``jax.profiler.ProfileData`` (or an ``.xplane.pb`` path)."""
    return read_ops(profile).times


def read_ops(profile) -> Ops:
    """:func:`op_times`, where they were read: ``"device XLA Ops"``, ``"device kernels"`` or
    ``"host thunks"`` (on a GPU the last would be launch times, not the device's: a trace
    without device ops says so instead of passing for one), and the idle seconds."""
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
    tasks = [_pool_tasks(line) for line in host] if source == "host thunks" else ()
    segments = _segments(per_line, tasks)
    calls = collections.Counter(name for line_events in per_line for name, _, _ in line_events)
    shares, idle = _shares(segments)
    return Ops({name: (shares.get(name, 0.0) / 1e9, n) for name, n in calls.items()}, source,
               idle / 1e9)


def summarize(times: Dict[str, Tuple[float, int]], steps: int, top: int = 15,
              source: str = "", idle_s: Optional[float] = None) -> Dict[str, Any]:
    """Per step: total op time, the kinds and the ``top`` ops by time, each with its share;
    ``source`` and ``idle_s``: where the times were read and the seconds with nothing running
    (:func:`read_ops`: the times are shares of the wall time); without ``idle_s`` the times are
    each op's own (torch's profiler: ops running at once both count)."""
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
            "idle_ms_per_step": None if idle_s is None else 1e3 * idle_s / steps,
            "ops_counted": len(times),
            "kinds": [{"kind": k, "ms_per_step": 1e3 * s / steps, "calls_per_step": n / steps,
                       "share": share(s)} for k, (s, n) in kinds[:top]],
            "top_ops": [{"op": o, "kind": kind(o), "ms_per_step": 1e3 * s / steps,
                         "calls_per_step": n / steps, "share": share(s)}
                        for o, (s, n) in ops[:top]]}


def markdown(summary: Dict[str, Any], title: str = "", ops: str = "XLA ops") -> str:
    """Two tables: the op kinds and the single ops with the most time per step; ``ops``: what
    was traced (a summary of torch's ops says so)."""
    idle = summary.get("idle_ms_per_step")
    # Thread-pool tasks exist on the CPU only (read_ops credits them for the host thunks).
    tasks = ("thread-pool tasks counted for their op; "
             if summary.get("source") == "host thunks" else "")
    how = ("ops running at once on two threads both count" if idle is None else
           f"each moment shared among the ops running, {tasks}{idle:.2f} ms/step with none")
    head = (f"{title}: " if title else "") + (
        f"{summary['op_ms_per_step']:.2f} ms of {ops} per step ({summary['steps']} traced "
        f"steps, {summary['ops_counted']} ops, read from the {summary.get('source') or 'trace'};"
        f" {how})")
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
        ops = read_ops(max(paths, key=os.path.getmtime))
        summary = summarize(ops.times, steps, source=ops.source, idle_s=ops.idle_s)
    return summary, args
