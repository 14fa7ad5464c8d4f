"""Layer-by-layer analysis of any Flax Linen model: shapes, parameters, MACs, receptive fields.

``analyze(model, (1, 224, 224, 3))`` returns one row per convolution, dense layer and pooling
window (plus one per parameterised or normalising leaf module such as batch norm), each with its
output shape, parameter count, multiply-accumulates and the receptive field of its output with
respect to the input (Araujo et al. 2019, "Computing Receptive Fields of Convolutional Neural
Networks"), per spatial axis:

    size_out  = size_in + (k - 1) * jump_in
    jump_out  = jump_in * stride
    start_out = start_in + ((k - 1) / 2 - pad_low) * jump_in

``k`` is the effective (dilated) window, ``start`` the centre of the first output unit's field in
input pixel coordinates (pixel centres at 0, 1, ...; negative = inside the padding).

How: the forward pass is traced with ``jax.make_jaxpr`` on abstract inputs (nothing is computed,
so a 224x224 ResNet-152 costs a trace, not a forward pass) and the equations are walked in order,
propagating a field (size, jump, start per input spatial axis, plus which tensor axis carries it)
through every primitive. Working on the jaxpr rather than on modules is what makes it generic:
pooling in this codebase is a plain function (``layers.max_pool`` -> ``lax.reduce_window``), skip
connections and concatenations are plain ``add``/``concatenate`` and user code may call ``lax``
directly; all of these are visible only as primitives. Module names come from
``nn.intercept_methods``: each module method runs under ``jax.named_scope`` with a unique per-call
marker, so every equation's ``source_info.name_stack`` says which module call emitted it
(sub-jaxprs of ``jit``, ``remat`` and ``custom_jvp``, which hold relative name stacks, inherit the
marker of their calling equation). Module interception alone would miss the pooling functions;
the jaxpr alone would lose the names. Parameters are attributed by data flow (the leaf that feeds
a conv/dot weight operand) and then by module path (biases, norm scales), so row parameters
always sum to the number of trainable parameters. This module depends on JAX and Flax only.

Conventions:
- Merges (residual ``add``, Inception/DenseNet ``concatenate``, any elementwise op) take the
  union of their inputs' fields: when the inputs are centred on the same pixel (true of every
  network here, all paddings being symmetric "same" paddings) the size is the maximum over inputs,
  Araujo et al.'s rule for multi-path networks; misaligned inputs give the span covering all.
- Reductions over spatial axes (global pooling) and flattening reshapes act as one window over the
  whole axis, so the dense layers of a classifier see the whole (padded) input.
- Reductions over the batch axis are statistics (batch norm in train mode), not features: their
  results carry no field, so RFs are the same in train and eval mode.
- RF sizes count padding, as in the paper: they can exceed the image.
- MACs: conv = output elements * kh * kw * cin / groups; dot_general = output elements *
  contracted size (the papers' and torchvision's convention). Pooling, normalisation, activations
  and bias additions count 0 MACs. FLOPs are reported as 2 * MACs. ``valid_macs`` counts only the
  kernel taps that read the input rather than the padding, which is what XLA counts.
- Agreement with XLA (``xla_flops``: cost analysis of the compiled forward pass), measured and
  tested on the registered convnets: 1.00 <= XLA / (2 * valid_macs) <= 1.05 at any input size
  (the excess is elementwise work: bias, batch norm, ReLU, pooling windows), and XLA is within
  10% of 2 * macs at 224x224 (0.92-0.99); at CIFAR sizes padding taps are a larger share.
- Depth: ``weight_layers`` counts conv/dense rows whose kernel is a parameter (a layer applied
  twice counts twice); ``depth`` is the longest chain of such layers from input to output (the
  papers' "16 layers", "50 layers", "121 layers").
- Not analysed inside: ``scan``/``while``/``cond`` bodies (their outputs get the union of their
  inputs' fields and their MACs are not counted; a note is added to ``Analysis.notes``).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import re
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from cnn_jax.models.layers import implementation


__all__ = ["LayerInfo", "Totals", "Analysis", "analyze", "xla_flops", "format_analysis",
           "FORMATS"]

FORMATS = ("table", "markdown", "csv", "json")
_MARKER = "cnnjax_call_"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One row: a conv/dense/pooling primitive or a leaf module (norm, dropout, ...)."""

    name: str  # module path, e.g. "layer1_0/conv1"; "<scope>/max_pool_0" for functions
    kind: str  # conv, dense, matmul, max_pool, avg_pool, global_avg_pool, batch_norm, params, ...
    module: str  # class of the module that emitted it ("" for the top-level scope)
    output_shape: Tuple[int, ...]
    params: int
    macs: int  # the papers' and torchvision's convention: every kernel tap, padding included
    valid_macs: int = 0  # only taps that land on the input, not on padding (XLA's count)
    rf_size: Tuple[float, ...] = ()  # per input spatial axis (H, W); () when input-independent
    rf_jump: Tuple[float, ...] = ()
    rf_start: Tuple[float, ...] = ()
    kernel: Optional[Tuple[int, ...]] = None  # spatial window of a conv / pool
    strides: Optional[Tuple[int, ...]] = None
    in_features: Optional[int] = None  # conv/dense input channels (all groups)
    out_features: Optional[int] = None
    groups: Optional[int] = None
    depth: int = 0  # longest chain of weight layers from the input up to and including this row
    has_weights: bool = False  # a conv/dense whose kernel is a parameter (shared ones too)


@dataclasses.dataclass(frozen=True)
class Totals:
    params: int  # trainable: every leaf of variables["params"]
    state: int  # other variables (batch-norm statistics)
    macs: int
    valid_macs: int
    weight_layers: int
    depth: int

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Rows in program order plus totals; iterating yields the rows."""

    model: str
    input_shape: Tuple[int, ...]
    layers: Tuple[LayerInfo, ...]
    totals: Totals
    notes: Tuple[str, ...] = ()

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def find(self, name: str) -> LayerInfo:
        """The row called ``name``."""
        for row in self.layers:
            if row.name == name:
                return row
        examples = ", ".join(repr(r.name) for r in self.layers[:3])
        raise KeyError(f"no layer {name!r}; names look like {examples or '(no layers)'}")

    def select(self, pattern: str = ".*", kinds: Optional[Sequence[str]] = None) -> List[LayerInfo]:
        """Rows whose name matches the regular expression (``re.search``) and, if given, kinds."""
        rx = re.compile(pattern)
        return [r for r in self.layers if rx.search(r.name) and (kinds is None or r.kind in kinds)]


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


# --------------------------------------------------------------------------------------------
# Public entry points.


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def _takes_train(model: nn.Module) -> bool:
    params = inspect.signature(type(model).__call__).parameters
    return "train" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _prepare(model: nn.Module, input_shape, train, variables, dtype, rngs, call_kwargs):
    kwargs = dict(call_kwargs)
    if train is not None and _takes_train(model):
        kwargs["train"] = train
    x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
    if rngs is None:
        rngs = {"dropout": jax.random.key(1)}
    if variables is None:
        init_rngs = {"params": jax.random.key(0), **rngs}
        variables = jax.eval_shape(
            lambda: model.init(init_rngs, jnp.zeros(x.shape, x.dtype), **kwargs))
    variables = _abstract(dict(variables))

    def apply(v, inp):
        return model.apply(v, inp, rngs=rngs, mutable=True, **kwargs)

    return apply, variables, x


def analyze(model: nn.Module, input_shape: Sequence[int] = (1, 224, 224, 3), *,
            train: Optional[bool] = False, variables: Any = None, dtype: Any = jnp.float32,
            spatial_axes: Optional[Sequence[int]] = None, rngs: Optional[dict] = None,
            **call_kwargs) -> Analysis:
    """Per-layer shapes, parameters, MACs and receptive fields of ``model`` (Araujo et al. 2019).

    ``train`` is passed only to models whose ``__call__`` takes it (``None``: never);
    ``variables`` (arrays or shapes) skips the abstract ``init``; ``spatial_axes`` defaults to
    all axes but the first (batch) and the last (channels); ``call_kwargs`` go to the model.
    Nothing is computed: the model is traced on abstract inputs.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < 2:
        raise ValueError(f"input_shape {input_shape} needs a batch axis: e.g. (1, 224, 224, 3)")
    spatial = tuple(range(1, len(input_shape) - 1)) if spatial_axes is None else tuple(spatial_axes)
    recorder = _CallRecorder()
    apply, variables, x = _prepare(model, input_shape, train, variables, dtype, rngs, call_kwargs)

    def traced(v, inp):
        # XLA's convolution primitives carry the window geometry the receptive-field rules read.
        with nn.intercept_methods(recorder), implementation("xla"):
            return apply(v, inp)

    closed = jax.make_jaxpr(traced)(variables, x)
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(variables)
    keys = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in leaves_with_path]
    sizes = [math.prod(leaf.shape) for _, leaf in leaves_with_path]
    is_param = [k[0] == "params" for k in keys]

    n = len(spatial)
    start = _Field(size=(1.0,) * n, jump=(1.0,) * n, start=(0.0,) * n, axes=spatial, batch=0,
                   depth=0)
    jaxpr = closed.jaxpr
    fields = [None] * len(leaves_with_path) + [start]
    origins = [frozenset([i]) if is_param[i] else frozenset() for i in range(len(keys))]
    origins.append(frozenset())
    walker = _Walker(n)
    outs = walker.walk(jaxpr, fields, origins, None)

    rows = _finish_rows(walker, recorder.calls)
    rows = _assign_params(rows, recorder.calls, keys, sizes, is_param)
    names = _names(rows, recorder.calls)
    layers = tuple(_to_info(r, name, recorder.calls) for r, name in zip(rows, names))
    out_fields = [f for f, _ in outs if f is not None]
    totals = Totals(
        params=sum(s for s, p in zip(sizes, is_param) if p),
        state=sum(s for s, p in zip(sizes, is_param) if not p),
        macs=sum(r.macs for r in layers),
        valid_macs=sum(r.valid_macs for r in layers),
        weight_layers=sum(r.has_weights for r in layers),
        depth=max((f.depth for f in out_fields), default=0),
    )
    assert sum(r.params for r in layers) == totals.params, "parameter attribution lost leaves"
    notes = tuple(dict.fromkeys(walker.notes))
    return Analysis(type(model).__name__, input_shape, layers, totals, notes)


def _leaf_calls(calls: Sequence[_Call]) -> set:
    paths = {c.path for c in calls}
    parents = {p[:i] for p in paths for i in range(len(p))}
    return {i for i, c in enumerate(calls) if c.path not in parents}


def _finish_rows(walker: _Walker, calls: Sequence[_Call]) -> List[_Row]:
    """Add one row per leaf module call that made no conv/dense/pool row (norms, LRN, ...)."""
    rows = list(walker.rows)
    for c in sorted(_leaf_calls(calls)):
        if c in walker.calls_with_rows or c not in walker.last_activation:
            continue
        seq, shape, field = walker.last_activation[c]
        rows.append(_Row(seq, c, _snake(calls[c].cls), shape, 0, field))
    rows.sort(key=lambda r: r.seq)
    return rows


def _assign_params(rows, calls, keys, sizes, is_param) -> List[_Row]:
    """Leaves feeding a weight operand go to that row; the rest (biases, norm scales) to the
    first row of their leaf module; leaves of modules without such a row to a "params" row."""
    claimed = set()
    for r in rows:
        mine = {i for i in r.leaves if is_param[i] and i not in claimed}
        r.leaves = frozenset(mine)
        claimed |= mine
    leaf_calls = _leaf_calls(calls)
    first_row: Dict[Tuple[str, ...], _Row] = {}
    for r in rows:
        if r.call in leaf_calls:
            first_row.setdefault(calls[r.call].path, r)
    orphans: Dict[Tuple[str, ...], _Row] = {}
    for i, k in enumerate(keys):
        if not is_param[i] or i in claimed:
            continue
        path = k[1:-1]
        if path in first_row:
            first_row[path].leaves |= {i}
        else:  # a module that made no row (an unused head) or params used elementwise
            row = orphans.setdefault(path, _Row(10 ** 12 + len(orphans), None, "params", (), 0,
                                                None, path=path))
            row.leaves |= {i}
    extra = list(orphans.values())
    for r in rows + extra:
        r.params = sum(sizes[i] for i in r.leaves)
    return rows + extra


def _names(rows: Sequence[_Row], calls: Sequence[_Call]) -> List[str]:
    """Leaf modules: their path (``#1``, ``#2`` for further rows); other scopes: kind_i."""
    leaves = _leaf_calls(calls)
    counts: Dict[Any, int] = {}
    names = []
    for r in rows:
        if r.path is not None:
            names.append("/".join(r.path) or "<root>")
            continue
        path = calls[r.call].path if r.call is not None else ()
        prefix = "/".join(path)
        if r.call in leaves and path:
            i = counts.get(path, 0)
            counts[path] = i + 1
            names.append(prefix if i == 0 else f"{prefix}#{i}")
        else:
            i = counts.get((path, r.kind), 0)
            counts[(path, r.kind)] = i + 1
            names.append(f"{prefix}/{r.kind}_{i}" if prefix else f"{r.kind}_{i}")
    return names


def _to_info(r: _Row, name: str, calls: Sequence[_Call]) -> LayerInfo:
    f = r.field
    rf = {} if f is None else dict(rf_size=_num(f.size), rf_jump=_num(f.jump),
                                   rf_start=_num(f.start))
    return LayerInfo(
        name=name, kind=r.kind, module=calls[r.call].cls if r.call is not None else "",
        output_shape=r.shape, params=r.params, macs=r.macs, valid_macs=r.valid_macs,
        kernel=r.kernel, strides=r.strides,
        in_features=r.in_features, out_features=r.out_features, groups=r.groups,
        depth=0 if f is None else f.depth, has_weights=r.weighted, **rf)


def _num(values) -> Tuple[float, ...]:
    return tuple(int(v) if float(v).is_integer() else float(v) for v in values)


def xla_flops(model: nn.Module, input_shape: Sequence[int] = (1, 224, 224, 3), *,
              train: Optional[bool] = False, variables: Any = None, dtype: Any = jnp.float32,
              rngs: Optional[dict] = None, **call_kwargs) -> float:
    """FLOPs of the compiled forward pass by XLA's cost analysis (compiles; no compute)."""
    apply, variables, x = _prepare(model, tuple(input_shape), train, variables, dtype, rngs,
                                   call_kwargs)
    cost = jax.jit(apply).lower(variables, x).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


# --------------------------------------------------------------------------------------------
# Formatting.

_COLUMNS = ("layer", "kind", "output", "params", "MACs", "RF", "jump", "start")


def _axes_str(values: Tuple[float, ...]) -> str:
    if not values:
        return "-"
    if all(v == values[0] for v in values):
        return f"{values[0]:g}"
    return "x".join(f"{v:g}" for v in values)


def _row_cells(r: LayerInfo, raw: bool = False) -> List[str]:
    shape = "x".join(map(str, r.output_shape[1:])) if r.output_shape else "-"
    number = str if raw else "{:,}".format
    return [r.name, r.kind, shape, number(r.params), number(r.macs), _axes_str(r.rf_size),
            _axes_str(r.rf_jump), _axes_str(r.rf_start)]


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], fmt: str) -> str:
    """Plain aligned text, GitHub markdown or CSV for a list of string rows."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue()
    numeric = [i > 0 and any(r[i] not in ("", "-") for r in rows)
               and all(re.fullmatch(r"[-\d,.x]+[KMG]?|-|", r[i]) for r in rows)
               for i in range(len(header))]
    if fmt == "markdown":
        right = numeric
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows]) + "\n"


def format_analysis(analysis: Analysis, fmt: str = "table") -> str:
    """The layer table with totals as ``table``, ``markdown``, ``csv`` or ``json``."""
    t = analysis.totals
    if fmt == "json":
        return json.dumps({
            "model": analysis.model, "input_shape": list(analysis.input_shape),
            "layers": [dataclasses.asdict(r) for r in analysis.layers],
            "totals": {**dataclasses.asdict(t), "flops": t.flops},
            "notes": list(analysis.notes)}, indent=1) + "\n"
    if fmt == "csv":
        total = ["total", "", "", str(t.params), str(t.macs), "", "", ""]
        return render_table(_COLUMNS, [_row_cells(r, raw=True) for r in analysis.layers]
                            + [total], fmt)
    body = render_table(_COLUMNS, [_row_cells(r) for r in analysis.layers], fmt)
    total = ["total", "", "", f"{t.params:,}", f"{t.macs:,}", "", "", ""]
    summary = (f"{analysis.model} on {'x'.join(map(str, analysis.input_shape))}: "
               f"{t.params:,} params ({_human(t.params)}), {t.state:,} other variables, "
               f"{t.macs:,} MACs ({_human(t.macs)}; FLOPs = 2 x MACs = {_human(t.flops)}), "
               f"{t.weight_layers} weight layers, depth {t.depth} (longest weight-layer path)")
    notes = "".join(f"note: {n}\n" for n in analysis.notes)
    if fmt == "markdown":
        return body + "| " + " | ".join(f"**{c}**" if c else "" for c in total) + " |\n\n" + \
            summary + "\n" + notes
    return body + "\n" + summary + "\n" + notes
