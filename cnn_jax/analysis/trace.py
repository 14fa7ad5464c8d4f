"""The trace rules: receptive fields, module names and the walk over a jaxpr's equations
(see the package docstring for the conventions)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.extend import core as jcore


_MARKER = "cnnjax_call_"

# --------------------------------------------------------------------------------------------
# Fields: the receptive field of element 0 of a tensor, per input spatial axis.


class _Field(NamedTuple):
    size: Tuple[float, ...]
    jump: Tuple[float, ...]
    start: Tuple[float, ...]
    axes: Tuple[Optional[int], ...]  # tensor axis running along each input spatial axis
    batch: Optional[int]  # tensor axis carrying the batch, None once merged away
    depth: int


def _set(t: tuple, i: int, v) -> tuple:
    return t[:i] + (v,) + t[i + 1:]


def _window(f: _Field, d: int, k: float, s: float, p: float, base_dilation: float = 1) -> _Field:
    j = f.jump[d] / base_dilation  # lhs/base dilation upsamples: input units get closer
    return f._replace(size=_set(f.size, d, f.size[d] + (k - 1) * j),
                      start=_set(f.start, d, f.start[d] + ((k - 1) / 2 - p) * j),
                      jump=_set(f.jump, d, j * s))


def _relabel(f: _Field, mapping: Dict[int, int], in_shape: Sequence[int]) -> _Field:
    """Move tensor axes (old -> new); mapped spatial axes not in ``mapping`` collapse."""
    for d, a in enumerate(f.axes):
        if a is not None and a not in mapping:
            n = in_shape[a]  # one window over the whole axis
            f = _window(f, d, n, n, 0)._replace(axes=_set(f.axes, d, None))
    return f._replace(axes=tuple(None if a is None else mapping[a] for a in f.axes),
                      batch=None if f.batch is None else mapping.get(f.batch))


def _union(fields: Sequence[Optional[_Field]], prefer: Sequence[Optional[_Field]] = ()
           ) -> Optional[_Field]:
    """Merge: the span covering all inputs' fields (= the max size when they are aligned)."""
    fields = [f for f in fields if f is not None]
    if not fields:
        return None
    if len(fields) == 1:
        return fields[0]
    prefer = [f for f in prefer if f is not None] or fields
    n = len(fields[0].size)
    size, jump, start, axes = [], [], [], []
    for d in range(n):
        lo = min(f.start[d] - (f.size[d] - 1) / 2 for f in fields)
        hi = max(f.start[d] + (f.size[d] - 1) / 2 for f in fields)
        mapped = [f for f in prefer if f.axes[d] is not None]
        size.append(hi - lo + 1)
        start.append((lo + hi) / 2)
        jump.append(mapped[0].jump[d] if mapped else max(f.jump[d] for f in fields))
        axes.append(mapped[0].axes[d] if mapped else None)
    batch = next((f.batch for f in prefer if f.batch is not None), None)
    return _Field(tuple(size), tuple(jump), tuple(start), tuple(axes), batch,
                  max(f.depth for f in fields))


def _valid_taps(size: int, out: int, k: int, stride: int, pad: int, dilation: int,
                base_dilation: int) -> int:
    """(output position, kernel tap) pairs along one axis that read the input, not padding."""
    o = np.arange(out)[:, None]
    idx = o * stride - pad + np.arange(k)[None, :] * dilation
    return int(np.sum((idx >= 0) & (idx % base_dilation == 0)
                      & (idx // base_dilation < size)))


def _reshape_map(old: Sequence[int], new: Sequence[int]) -> Dict[int, int]:
    """Old axes that survive a reshape unchanged: same size and same prefix products."""
    out = {}
    for a in range(len(old)):
        before, after = math.prod(old[:a]), math.prod(old[:a + 1])
        for b in range(len(new)):
            if math.prod(new[:b]) == before and math.prod(new[:b + 1]) == after:
                out[a] = b
                break
    return out


# --------------------------------------------------------------------------------------------
# Module names: every module method call runs under a named scope carrying a unique marker.


class _Call(NamedTuple):
    path: Tuple[str, ...]
    cls: str


class _CallRecorder:
    def __init__(self):
        self.calls: List[_Call] = []
        self._stack: List[Tuple[str, ...]] = []

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        path = tuple(module.path) if module.scope is not None else ()
        # setup() creates submodules and params, and a module's helper methods belong to the
        # call that invoked them: neither opens a new scope.
        if context.method_name == "setup" or (self._stack and self._stack[-1] == path):
            return next_fun(*args, **kwargs)
        call_id = len(self.calls)
        self.calls.append(_Call(path, type(module).__name__))
        self._stack.append(path)
        try:
            with jax.named_scope(f"{_MARKER}{call_id}"):
                return next_fun(*args, **kwargs)
        finally:
            self._stack.pop()


def _innermost_call(eqn, outer: Optional[int]) -> Optional[int]:
    call = outer
    for entry in eqn.source_info.name_stack.stack:
        name = getattr(entry, "name", "")
        if name.startswith(_MARKER):
            call = int(name[len(_MARKER):])
    return call


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


# --------------------------------------------------------------------------------------------
# The walk over the jaxpr.

_PASSTHROUGH = {"convert_element_type", "reshape", "transpose", "broadcast_in_dim", "squeeze",
                "copy", "copy_p", "reduce_precision", "slice", "expand_dims", "rev"}
_POOL_KINDS = {"reduce_window_max": "max_pool", "reduce_window_sum": "avg_pool",
               "reduce_window_min": "min_pool", "reduce_window": "pool"}
_REDUCE_KINDS = {"reduce_sum": "global_avg_pool", "reduce_max": "global_max_pool",
                 "argmax": None, "argmin": None, "reduce_min": "global_min_pool",
                 "reduce_prod": None, "reduce_and": None, "reduce_or": None, "reduce_xor": None}
_CONTROL_FLOW = {"scan", "while", "cond"}


@dataclasses.dataclass
class _Row:
    seq: int
    call: Optional[int]
    kind: str
    shape: Tuple[int, ...]
    macs: int
    field: Optional[_Field]
    valid_macs: int = 0
    leaves: frozenset = frozenset()
    kernel: Optional[Tuple[int, ...]] = None
    strides: Optional[Tuple[int, ...]] = None
    in_features: Optional[int] = None
    out_features: Optional[int] = None
    groups: Optional[int] = None
    weighted: bool = False
    params: int = 0
    path: Optional[Tuple[str, ...]] = None  # module path of a "params" row (no call)


class _Walker:
    def __init__(self, n_spatial: int):
        self.n = n_spatial
        self.rows: List[_Row] = []
        self.seq = 0
        self.notes: List[str] = []
        # Per module call: the last equation output that is a per-example activation.
        self.last_activation: Dict[int, Tuple[int, Tuple[int, ...], _Field]] = {}
        self.calls_with_rows: set = set()

    def walk(self, jaxpr, fields, origins, call: Optional[int]):
        env: Dict[Any, Optional[_Field]] = {}
        org: Dict[Any, frozenset] = {}
        for v, f, o in zip(jaxpr.invars, fields, origins):
            env[v], org[v] = f, o

        def read(v):
            if isinstance(v, jcore.Literal):
                return None, frozenset()
            return env.get(v), org.get(v, frozenset())

        for eqn in jaxpr.eqns:
            c = _innermost_call(eqn, call)
            ins = [read(v) for v in eqn.invars]
            in_fields = [f for f, _ in ins]
            in_orig = [o for _, o in ins]
            out_fields, out_orig = self.equation(eqn, in_fields, in_orig, c)
            for v, f, o in zip(eqn.outvars, out_fields, out_orig):
                if isinstance(v, jcore.DropVar):
                    continue
                env[v], org[v] = f, o
                if f is not None and f.batch is not None and c is not None:
                    self.last_activation[c] = (self.seq, tuple(v.aval.shape), f)
            self.seq += 1
        return [read(v) for v in jaxpr.outvars]

    # One equation -> (fields, origins) of its outputs.
    def equation(self, eqn, fields, origins, call):
        name = eqn.primitive.name
        subs = [(k, p) for k, p in eqn.params.items()
                if isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        if name in _CONTROL_FLOW or (subs and not self._callable(eqn, subs)):
            self.notes.append(f"{name}: body not analysed (MACs inside not counted)")
            return self._fallback(eqn, fields), [frozenset()] * len(eqn.outvars)
        if subs:
            sub = subs[0][1]
            inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
            outs = self.walk(inner, fields, origins, call)
            return [f for f, _ in outs], [o for _, o in outs]
        if name in _PASSTHROUGH and origins and origins[0]:
            out_orig = [origins[0]] * len(eqn.outvars)
        else:
            out_orig = [frozenset()] * len(eqn.outvars)
        handler = getattr(self, "_rule_" + name, None)  # a rule per primitive, else elementwise
        if name in _POOL_KINDS:
            handler = self._pool
        elif name in _REDUCE_KINDS:
            handler = self._reduce
        out = handler(eqn, fields, origins, call) if handler else self._fallback(eqn, fields)
        return out, out_orig

    @staticmethod
    def _callable(eqn, subs) -> bool:
        if len(subs) != 1:
            return False
        sub = subs[0][1]
        inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
        return len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars)

    def _row(self, eqn, call, kind, field, macs=0, leaves=frozenset(), valid_macs=0,
             **kw) -> None:
        self.rows.append(_Row(self.seq, call, kind, tuple(eqn.outvars[0].aval.shape), int(macs),
                              field, int(valid_macs), frozenset(leaves), **kw))
        if call is not None:
            self.calls_with_rows.add(call)

    def _fallback(self, eqn, fields):
        """Elementwise-style: union of the inputs; same-shape inputs keep their axes."""
        outs = []
        for v in eqn.outvars:
            shape = tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()
            same = [f for f, u in zip(fields, eqn.invars)
                    if f is not None and tuple(getattr(u.aval, "shape", ())) == shape]
            if same:
                outs.append(_union(fields, prefer=same))
            else:
                collapsed = [_relabel(f, {}, u.aval.shape)._replace(batch=None)
                             for f, u in zip(fields, eqn.invars) if f is not None]
                outs.append(_union(collapsed))
        return outs

    def _rule_conv_general_dilated(self, eqn, fields, origins, call):
        lhs, rhs = eqn.invars[:2]
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        out = eqn.outvars[0].aval.shape
        ks = tuple(rhs.aval.shape[a] for a in rhs_spec[2:])
        f = fields[0]
        if f is not None:
            for i, a in enumerate(lhs_spec[2:]):
                k_eff = (ks[i] - 1) * p["rhs_dilation"][i] + 1
                for d in range(self.n):
                    if f.axes[d] == a:
                        f = _window(f, d, k_eff, p["window_strides"][i], p["padding"][i][0],
                                    p["lhs_dilation"][i])
            f = _relabel(f, dict(zip(lhs_spec, out_spec)), lhs.aval.shape)
        f = _union([f, _relabel(fields[1], {}, rhs.aval.shape) if fields[1] else None])
        weighted = fields[1] is None and bool(origins[1])
        if f is not None and weighted:
            f = f._replace(depth=f.depth + 1)
        rhs_in = rhs.aval.shape[rhs_spec[1]]
        groups = p["feature_group_count"]
        macs = math.prod(out) * math.prod(rhs.aval.shape) // rhs.aval.shape[rhs_spec[0]]
        taps = [_valid_taps(lhs.aval.shape[a], out[b], ks[i], p["window_strides"][i],
                            p["padding"][i][0], p["rhs_dilation"][i], p["lhs_dilation"][i])
                for i, (a, b) in enumerate(zip(lhs_spec[2:], out_spec[2:]))]
        valid = (out[out_spec[0]] * out[out_spec[1]] * rhs.aval.shape[rhs_spec[1]]
                 * math.prod(taps))
        self._row(eqn, call, "conv", f, macs, origins[1], valid_macs=valid, kernel=ks,
                  strides=tuple(p["window_strides"]), in_features=rhs_in * groups,
                  out_features=rhs.aval.shape[rhs_spec[0]], groups=groups, weighted=weighted)
        return [f]

    def _rule_dot_general(self, eqn, fields, origins, call):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars[:2]
        ls, rs = lhs.aval.shape, rhs.aval.shape
        lfree = [a for a in range(len(ls)) if a not in lc and a not in lb]
        rfree = [a for a in range(len(rs)) if a not in rc and a not in rb]
        lmap = {a: i for i, a in enumerate(lb)}
        lmap.update({a: len(lb) + i for i, a in enumerate(lfree)})
        rmap = {a: i for i, a in enumerate(rb)}
        rmap.update({a: len(lb) + len(lfree) + i for i, a in enumerate(rfree)})
        fl = _relabel(fields[0], lmap, ls) if fields[0] is not None else None
        fr = _relabel(fields[1], rmap, rs) if fields[1] is not None else None
        f = _union([fl, fr])
        # A dense layer: one operand is the activation, the other comes from parameters.
        weight = (1 if fr is None and fl is not None else
                  0 if fl is None and fr is not None else None)
        weighted = weight is not None and bool(origins[weight])
        if f is not None and weighted:
            f = f._replace(depth=f.depth + 1)
        out = eqn.outvars[0].aval.shape
        contracted = math.prod(ls[a] for a in lc)
        macs = math.prod(out) * contracted
        leaves = origins[1] if fr is None else origins[0] if fl is None else frozenset()
        self._row(eqn, call, "matmul" if fl is not None and fr is not None else "dense", f, macs,
                  leaves, valid_macs=macs, in_features=contracted,
                  out_features=math.prod(rs[a] for a in rfree), weighted=weighted)
        return [f]

    def _pool(self, eqn, fields, origins, call):
        p = eqn.params
        n_ops = len(eqn.invars) // 2 if eqn.primitive.name == "reduce_window" else 1
        kernel, strides, spatial = [], [], False
        outs = []
        for f, v in zip(fields[:n_ops], eqn.invars[:n_ops]):
            if f is not None:
                for d in range(self.n):
                    a = f.axes[d]
                    if a is None:
                        continue
                    k = (p["window_dimensions"][a] - 1) * p["window_dilation"][a] + 1
                    s = p["window_strides"][a]
                    f = _window(f, d, k, s, p["padding"][a][0], p["base_dilation"][a])
                    kernel.append(p["window_dimensions"][a])
                    strides.append(s)
                    spatial |= k > 1 or s > 1
            outs.append(f)
        if spatial and outs[0] is not None and outs[0].batch is not None:
            self._row(eqn, call, _POOL_KINDS[eqn.primitive.name], outs[0], 0,
                      kernel=tuple(kernel[:self.n]), strides=tuple(strides[:self.n]))
        return outs

    def _reduce(self, eqn, fields, origins, call):
        axes = set(eqn.params["axes"])
        v = eqn.invars[0]
        f = fields[0]
        if f is None:
            return [None]
        if f.batch is not None and f.batch in axes:
            return [None]  # a statistic over the batch (batch norm in train mode), no field
        keep = [a for a in range(len(v.aval.shape)) if a not in axes]
        g = _relabel(f, {a: i for i, a in enumerate(keep)}, v.aval.shape)
        kind = _REDUCE_KINDS[eqn.primitive.name]
        window = [v.aval.shape[f.axes[d]] for d in range(self.n)
                  if f.axes[d] is not None and f.axes[d] in axes]
        if kind and any(k > 1 for k in window):
            self._row(eqn, call, kind, g, 0, kernel=tuple(window))
        return [g]

    def _rule_reshape(self, eqn, fields, origins, call):
        f = fields[0]
        if f is None:
            return [None]
        old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        return [_relabel(f, _reshape_map(old, new), old)]

    def _rule_squeeze(self, eqn, fields, origins, call):
        f = fields[0]
        if f is None:
            return [None]
        shape = eqn.invars[0].aval.shape
        keep = [a for a in range(len(shape)) if a not in eqn.params["dimensions"]]
        return [_relabel(f, {a: i for i, a in enumerate(keep)}, shape)]

    def _rule_expand_dims(self, eqn, fields, origins, call):
        return self._rule_reshape(eqn, fields, origins, call)

    def _rule_transpose(self, eqn, fields, origins, call):
        f = fields[0]
        if f is None:
            return [None]
        perm = eqn.params["permutation"]
        return [_relabel(f, {a: i for i, a in enumerate(perm)}, eqn.invars[0].aval.shape)]

    def _rule_broadcast_in_dim(self, eqn, fields, origins, call):
        f = fields[0]
        if f is None:
            return [None]
        dims = eqn.params["broadcast_dimensions"]
        return [_relabel(f, {a: b for a, b in enumerate(dims)}, eqn.invars[0].aval.shape)]

    def _rule_concatenate(self, eqn, fields, origins, call):
        return [_union(fields)]

    def _rule_pad(self, eqn, fields, origins, call):
        f = fields[0]
        if f is None:
            return [_union(fields)]
        for d in range(self.n):
            a = f.axes[d]
            if a is not None:
                lo, _, interior = eqn.params["padding_config"][a]
                f = _window(f, d, 1, 1, int(lo), 1 + int(interior))
        return [f]

    def _rule_slice(self, eqn, fields, origins, call):
        f = fields[0]
        if f is None:
            return [None]
        strides = eqn.params["strides"] or (1,) * len(eqn.invars[0].aval.shape)
        for d in range(self.n):
            a = f.axes[d]
            if a is not None:
                f = _window(f, d, 1, strides[a], -eqn.params["start_indices"][a])
        return [f]
