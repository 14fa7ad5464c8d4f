"""The entry points: ``analyze`` (any Flax module, traced) and ``xla_flops``."""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.analysis.results import Analysis, LayerInfo, Totals
from cnn_jax.analysis.trace import _Call, _CallRecorder, _Field, _Row, _snake, _Walker
from cnn_jax.models.layers import implementation, shapes_only

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
        with shapes_only():  # shapes need no random draws traced
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
    """FLOPs of the compiled forward pass by XLA's cost analysis (compiles; no compute), traced
    with XLA's own convolutions and pooling (``layers.implementation("xla")``): the network's
    arithmetic, not the CPU formulations' (a space-to-depth stem's zero taps, say)."""
    apply, variables, x = _prepare(model, tuple(input_shape), train, variables, dtype, rngs,
                                   call_kwargs)
    with implementation("xla"):  # a fresh function: jit caches traces by function
        lowered = jax.jit(lambda v, x: apply(v, x)).lower(variables, x)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])
