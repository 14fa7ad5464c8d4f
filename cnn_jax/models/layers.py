"""Layers shared by every family: torch-style padded conv/pool, conv-norm-act, LRN, heads.

All tensors are NHWC. Padding is given as torch's symmetric integer padding rather than Flax's
``'SAME'``: ``'SAME'`` pads asymmetrically for stride-2 layers (more on the bottom/right), which
shifts every sampling grid by one pixel and breaks weight compatibility with torchvision.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import os
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax import host

Array = jax.Array
Dtype = Any
IntOrPair = Union[int, Tuple[int, int]]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}

# Kaiming-normal with fan_out, torchvision's init for conv layers of ReLU networks (He et al. 2015).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _zeros_init(key, shape, dtype=jnp.float32):
    del key
    return jax.lax.full(shape, 0, dtype)  # one primitive: jnp.zeros is a jitted function


_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Within this block (at trace time) ``param`` initializes with one ``lax.full`` of the
    parameter's shape and dtype, not its initializer: for ``jax.eval_shape`` of ``init``, whose
    variables are then the same ``ShapeDtypeStruct``s without tracing each random initializer
    (dozens of ops per kernel: densenet121's at 224 px 0.94 -> 0.72 s). Outside
    ``eval_shape`` the parameters would be zeros: ``models.abstract_variables`` uses it."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def param(module: nn.Module, name: str, init_fn: Callable, shape, dtype=jnp.float32) -> Array:
    """``module.param(name, init_fn, shape, dtype)``, for a parameter of a known shape.

    In ``apply`` Flax checks an existing parameter's shape by tracing its initializer
    (``jax.eval_shape``); a truncated-normal kernel initializer is dozens of ops (densenet121's
    init and first train-step trace under cProfile: 1.0 s of 18 s less without them). There the
    check traces one ``lax.full`` of the same shape and dtype instead: same check, same errors,
    and ``init`` still draws from ``init_fn`` (except under ``shapes_only``)."""
    if _SHAPES_ONLY.get() or module.has_variable("params", name):
        init_fn = _zeros_init
    return module.param(name, init_fn, shape, dtype)


# --- Fast CPU formulations -------------------------------------------------------------------
# XLA:CPU runs 1x1 convolutions 2-4x slower than the same product as a matrix multiply, the weight
# gradient of a 3x3 convolution 2-4x slower than its forward pass, and the gradient of an
# overlapping max pool (select-and-scatter) 4x slower than the same gradient written as masks over
# strided slices, and autodiff's BatchNorm backward reads and writes twice what it needs
# (measured in ../shared/perf and `python -m cnn_jax.benchmark`). On CPU the layers
# below therefore compute these with matrix products and slices, through ``jax.custom_vjp`` where
# only the gradient changes. GPUs and TPUs keep XLA's own ops (cuDNN / the MXU are fast there).
# Parameters are untouched, and values and gradients equal XLA's ops (tests/test_fast_layers.py).

IMPLEMENTATIONS = ("auto", "xla", "fast")
# The formulations that can be chosen one by one ('fast:max_pool+conv1x1'): 1x1 convolutions as
# matrix products, the other convolution rewrites (strided stems, Winograd, per-tap gradients),
# max pooling's gradient as masks over strided slices, and training BatchNorm's own backward.
FAST_OPS = ("conv1x1", "conv", "max_pool", "batch_norm")
_IMPLEMENTATION: contextvars.ContextVar[str] = contextvars.ContextVar("implementation",
                                                                     default="auto")


def _fast_ops(impl: str) -> Optional[frozenset]:
    """The ops of a 'fast:OP+OP' implementation (None: not of that form); ValueError if unknown."""
    if not impl.startswith("fast:"):
        return None
    ops = frozenset(o for o in impl[len("fast:"):].split("+") if o)
    unknown = sorted(ops - set(FAST_OPS))
    if unknown or not ops:
        raise ValueError(f"unknown layer implementation {impl!r}; 'fast:' takes one or more of "
                         f"{', '.join(FAST_OPS)} joined by '+', e.g. fast:max_pool+conv1x1")
    return ops


@contextlib.contextmanager
def implementation(impl: str):
    """Within this block (at trace time) layers use ``impl``: 'auto' (the fast formulations on
    CPU, XLA's ops elsewhere), 'xla' (always ``lax.conv_general_dilated`` / ``reduce_window``),
    'fast' (always the matmul and slice formulations) or 'fast:OP+OP' (only those of
    ``FAST_OPS``, XLA's ops for the rest: an A/B of one formulation). It is read when a function
    is traced, and ``jax.jit`` caches traces by function, not by this setting: jit a new function
    (e.g. a fresh lambda) for each implementation, or the second runs the first one's program."""
    if impl not in IMPLEMENTATIONS and _fast_ops(impl) is None:
        raise ValueError(f"unknown layer implementation {impl!r}; choose one of "
                         f"{IMPLEMENTATIONS} or fast:OP+OP with OPs of {FAST_OPS}")
    token = _IMPLEMENTATION.set(impl)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def use_fast_formulations(op: Optional[str] = None) -> bool:
    """Whether layers traced now use the fast formulation of ``op`` (one of ``FAST_OPS``; None:
    all of them), see ``implementation``."""
    impl = _IMPLEMENTATION.get()
    ops = _fast_ops(impl)
    if ops is not None:
        return op in ops if op is not None else ops == set(FAST_OPS)
    return impl == "fast" or (impl == "auto" and jax.default_backend() == "cpu")


def get_activation(name: str) -> Callable[[Array], Array]:
    """Return the activation function registered under ``name``."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def pair(v: IntOrPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def torch_padding(padding: IntOrPair) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Symmetric (torch-style) padding as Flax's per-dimension ``(low, high)`` pairs."""
    ph, pw = pair(padding)
    return ((ph, ph), (pw, pw))


def _ceil_extra(size: int, window: int, stride: int, pad: int) -> int:
    """Extra high-side padding that turns floor-mode pooling into torch's ``ceil_mode=True``.

    torch adds one output when the last window would start inside the (left-padded) input, but
    never one that starts in the right padding only.
    """
    out_floor = (size + 2 * pad - window) // stride + 1
    out_ceil = -(-(size + 2 * pad - window) // stride) + 1
    if (out_ceil - 1) * stride >= size + pad:
        out_ceil -= 1
    return max(0, (out_ceil - out_floor) * stride)


def max_pool(x: Array, window: IntOrPair, stride: IntOrPair, padding: IntOrPair = 0,
             ceil_mode: bool = False) -> Array:
    """torch ``MaxPool2d`` on NHWC: -inf padding, optional ``ceil_mode``."""
    (kh, kw), (sh, sw), (ph, pw) = pair(window), pair(stride), pair(padding)
    eh = _ceil_extra(x.shape[1], kh, sh, ph) if ceil_mode else 0
    ew = _ceil_extra(x.shape[2], kw, sw, pw) if ceil_mode else 0
    padding = ((ph, ph + eh), (pw, pw + ew))
    if use_fast_formulations("max_pool"):
        return _max_pool_jit(x, (kh, kw), (sh, sw), padding)
    return _xla_max_pool(x, (kh, kw), (sh, sw), padding)


def _xla_max_pool(x: Array, window, strides, padding) -> Array:
    return nn.max_pool(x, window, strides, padding=padding)


def _pool_windows(x: Array, window, strides, padding) -> List[Array]:
    """Each tap's strided window of ``x`` padded with -inf, in row-major tap order (every tap,
    not only the live ones: the gradient numbers them): window (i, j) holds tap (i, j) of every
    output's window."""
    geo = _geometry(x.shape, window, strides, padding)
    n, c = x.shape[0], x.shape[-1]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)
    return [jax.lax.slice(xp, *geo.tap_window(i, j, n, c))
            for i in range(window[0]) for j in range(window[1])]


# The forward pass as the maximum of the taps' strided windows (one element-wise loop) rather
# than XLA's reduce-window: XLA:CPU hands reduce-windows to YNNPACK, which then takes in the
# convolutions, products and element-wise ops around them as one library call, far slower than
# its parts: in vgg16's eval forward (batch 8 at 224 px) one such call, of block 5's three
# convolutions, both pools around them and the classifier, took 1.09 s of 2.2 s. On the 2-core
# AMD AVX-512 host (2026-12-06, in one process, both build orders, medians of 5 rounds),
# reduce-window -> windows, ms: vgg16 eval 1998 -> 961 and 2101 -> 1035 (train unchanged),
# googlenet train 1166 -> 1063 and 1046 -> 995, eval 361 -> 314 and 309 -> 281; alexnet and
# resnet50 within 4%. The values are the same maxima, so results do not change.
def _max_pool_by_windows(x: Array, window, strides, padding) -> Array:
    return functools.reduce(jnp.maximum, _pool_windows(x, window, strides, padding))


def _materialize(x: Array) -> Array:
    """``x``, computed once into a buffer of its own: XLA:CPU drops ``optimization_barrier``
    before fusing, but does not fuse across a conditional. Both branches return ``x`` times one
    (JAX would drop a branch that returns its operand)."""
    if not x.size:
        return x
    first = x.reshape(-1)[0]
    return jax.lax.cond(first == first, lambda v: v * 1, lambda v: v * 1, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_slice_grad(x: Array, window, strides, padding) -> Array:
    return _max_pool_by_windows(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
    y = _max_pool_by_windows(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
    # Each output's gradient goes to the first input of its window (row-major) that equals the
    # maximum, as XLA's select-and-scatter and torch do. Written as a gather, so that XLA fuses
    # it into one loop per stride phase: the padded input rows p = s * m + a (phase a) receive
    # from the taps i = a, a + s, ... only, tap i from output m - (i - a) // s, so each phase sums
    # shifted (not strided) slices of g, where the output's first-maximum tap ``first[o]`` is that
    # tap, at the output's resolution; the phases are then interleaved. At stride 2 this reads a
    # quarter of what spreading g over the input's grid did (batch 16, gradient of one pool
    # alone, ms: googlenet's first pool, 112x112x64 3x3/2, 60.3 -> 17.8; vgg16's 224x224x64 2x2/2
    # at batch 8, 51.4 -> 10.5; resnet50's 34 -> 16; stride 1 unchanged: one phase).
    x, y = residuals
    (kh, kw), (sh, sw) = window, strides
    n, ho, wo, c = y.shape
    hp, wp = x.shape[1] + sum(padding[0]), x.shape[2] + sum(padding[1])
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    # int8 taps (up to 11x11 windows): a quarter of int32's bytes to pad and read, the stride-1
    # pools' gradient 20% faster alone (googlenet's 28x28x192 7.5 -> 5.8 ms, 14x14x480 6.2 -> 4.9)
    tap_dtype = jnp.int8 if len(taps) < 127 else jnp.int32
    first = jnp.full(y.shape, len(taps), tap_dtype)
    windows = _pool_windows(x, window, strides, padding)
    for t in reversed(range(len(taps))):
        first = jnp.where(windows[t] == y, jnp.array(t, tap_dtype), first)
    mh, mw = -(-hp // sh), -(-wp // sw)  # rows and columns of a phase (the last ones cut below)
    dh, dw = (kh - 1) // sh, (kw - 1) // sw  # the furthest output back that a phase reads
    pad = ((0, 0, 0), (dh, max(0, mh - ho), 0), (dw, max(0, mw - wo), 0), (0, 0, 0))
    if kh > sh or kw > sw:  # overlapping windows: each phase reads g at several taps
        g = _materialize(g)
    g_pad = jax.lax.pad(g, jnp.zeros((), g.dtype), pad)
    first_pad = jax.lax.pad(first, jnp.array(-1, first.dtype), pad)
    zero = jnp.zeros((), g.dtype)
    phases = []
    for a in range(sh):
        for b in range(sw):
            dxp = jnp.zeros((n, mh, mw, c), g.dtype)
            for i in range(a, kh, sh):
                for j in range(b, kw, sw):
                    start = (0, dh - (i - a) // sh, dw - (j - b) // sw, 0)
                    limit = (n, start[1] + mh, start[2] + mw, c)
                    dxp = dxp + jnp.where(jax.lax.slice(first_pad, start, limit) == i * kw + j,
                                          jax.lax.slice(g_pad, start, limit), zero)
            phases.append(dxp)
    dxp = stack(phases).reshape(sh, sw, n, mh, mw, c).transpose(2, 3, 0, 4, 1, 5)
    dxp = dxp.reshape(n, mh * sh, mw * sw, c)
    (top, _), (left, _) = padding
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool_slice_grad.defvjp(_max_pool_fwd, _max_pool_bwd)
# Jitted as a unit, as _conv_fast_jit: op by op its pad, window slices and maxima (and in the
# gradient its taps' selects) would compile one program each per shape (a 3x3 pool's forward: 11).
_max_pool_jit = jax.jit(_max_pool_slice_grad, static_argnums=(1, 2, 3))


def avg_pool(x: Array, window: IntOrPair, stride: IntOrPair, padding: IntOrPair = 0) -> Array:
    """torch ``AvgPool2d`` on NHWC (``count_include_pad=True``, torch's default)."""
    window, stride = pair(window), pair(stride)
    if (window == stride and pair(padding) == (0, 0) and _is_bf16(x)
            and use_fast_formulations()):
        return _avg_pool_blocks(x, window)
    return nn.avg_pool(x, window, stride, padding=torch_padding(padding), count_include_pad=True)


# A bfloat16 pool whose windows tile the input (DenseNet's transitions, 2x2/2) as the float32 mean
# over each block's own axes of the input reshaped to [N, Ho, kh, Wo, kw, C]: a reduction, and its
# gradient a broadcast, where XLA's reduce-window sums in bf16, rounding after each add, and its
# gradient is another reduce-window, over the output gradient padded between its values.
# densenet121's bf16 steps, A/B in one process, both build orders (Intel AMX host, family 6 model
# 167, 2026-12-07, ms): train 1,477 -> 1,441 and 1,422 -> 1,368, eval 330 -> 314 and 314 -> 301.
# float32 keeps XLA's (train level: 1,867 -> 1,887 and 2,028 -> 2,005; eval 533 -> 540 and 548 ->
# 573).
def _avg_pool_blocks(x: Array, window: Tuple[int, int]) -> Array:
    """The mean of each ``window`` block (rows and columns past the last whole block dropped, as
    torch's floor mode)."""
    (kh, kw), (n, h, w, c) = window, x.shape
    ho, wo = h // kh, w // kw
    blocks = x[:, :ho * kh, :wo * kw].reshape(n, ho, kh, wo, kw, c)
    return jnp.mean(blocks, axis=(2, 4)).astype(x.dtype)


def adaptive_avg_pool(x: Array, output_size: IntOrPair) -> Array:
    """torch ``AdaptiveAvgPool2d`` on NHWC: bin i averages rows floor(iH/o) .. ceil((i+1)H/o)."""
    oh, ow = pair(output_size)
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:  # equal, non-overlapping bins: a plain average pool
        return nn.avg_pool(x, (h // oh, w // ow), (h // oh, w // ow))

    def bins(n: int, o: int):
        return [(math.floor(i * n / o), math.ceil((i + 1) * n / o)) for i in range(o)]

    rows = [jnp.mean(x[:, a:b], axis=1) for a, b in bins(h, oh)]  # each [N, W, C]
    x = stack(rows, axis=1)  # [N, oh, W, C]
    cols = [jnp.mean(x[:, :, a:b], axis=2) for a, b in bins(w, ow)]
    return stack(cols, axis=2)


def global_avg_pool(x: Array) -> Array:
    """Average over the spatial axes: [N, H, W, C] -> [N, C]."""
    return jnp.mean(x, axis=(1, 2))


# XLA:CPU concatenates bfloat16 arrays in float32: it converts the operands up and the result
# back, and the converts (with the producers fused into them) make the concatenation one loop
# far below copy speed. The same bits as uint16 concatenate as a plain copy. Intel AMX host
# (family 6 model 167, 2026-12-07, medians of 9, ms): nine [50000, 256] arrays, bfloat16 ->
# uint16 bits, on the last axis 105.4 -> 19.3, stacked 137.2 -> 33.4 (float32: 35.8, 65.2); the
# gradient of googlenet's 3x3/2 max pool at 14x14x832 (whose phases are stacked), batch 16,
# 13.4 -> 5.5, at 112x112x64 72.2 -> 38.8 (float32: 4.5, 22.6).
def concatenate(arrays: Sequence[Array], axis: int = -1) -> Array:
    """``jnp.concatenate``; with the fast formulations (the CPU), bfloat16 arrays as their uint16
    bits (the same values)."""
    arrays = tuple(arrays)
    if (len(arrays) < 2 or not all(_is_bf16(a) for a in arrays)
            or not use_fast_formulations()):
        return jnp.concatenate(arrays, axis)
    axis = axis % arrays[0].ndim
    return _concatenate_bits(arrays, axis, tuple(a.shape[axis] for a in arrays))


def stack(arrays: Sequence[Array], axis: int = 0) -> Array:
    """``jnp.stack`` by ``concatenate``."""
    return concatenate([jnp.expand_dims(a, axis) for a in arrays], axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _concatenate_bits(arrays: Tuple[Array, ...], axis: int, sizes: Tuple[int, ...]) -> Array:
    bits = [jax.lax.bitcast_convert_type(a, jnp.uint16) for a in arrays]
    return jax.lax.bitcast_convert_type(jnp.concatenate(bits, axis), arrays[0].dtype)


def _concatenate_bits_fwd(arrays, axis, sizes):
    return _concatenate_bits(arrays, axis, sizes), None


def _concatenate_bits_bwd(axis, sizes, _, g):
    return (tuple(jnp.split(g, list(itertools.accumulate(sizes[:-1])), axis=axis)),)


_concatenate_bits.defvjp(_concatenate_bits_fwd, _concatenate_bits_bwd)


def flatten(x: Array) -> Array:
    """Flatten per example in NHWC (H, W, C) order; torch flattens (C, H, W), see cnn_jax.convert."""
    return x.reshape((x.shape[0], -1))


# --- Convolutions ---------------------------------------------------------------------------

Padding = Tuple[Tuple[int, int], Tuple[int, int]]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding,
              groups: int = 1) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=_DIMENSION_NUMBERS,
                                        feature_group_count=groups)


def _out_size(size: int, k: int, s: int, pad: Tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // s + 1


class _Geometry(NamedTuple):
    """Static shape facts of one convolution: which kernel taps ever see the unpadded input."""

    kernel_hw: Tuple[int, int]
    strides: Tuple[int, int]
    padding: Padding
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]

    @property
    def live_taps(self) -> List[Tuple[int, int]]:
        # A tap whose every row (or column) lands in the zero padding contributes nothing: at
        # 1x1 inputs a padded 3x3 conv is just its centre tap.
        def live(i: int, d: int) -> bool:
            lo = self.padding[d][0]
            return any(lo <= i + r * self.strides[d] < lo + self.in_hw[d]
                       for r in range(self.out_hw[d]))

        kh, kw = self.kernel_hw
        return [(i, j) for i in range(kh) if live(i, 0) for j in range(kw) if live(j, 1)]

    def tap_window(self, i: int, j: int, n: int, c: int):
        """(start, limit, strides) of tap (i, j)'s input window in the padded input."""
        (sh, sw), (ho, wo) = self.strides, self.out_hw
        return (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)

    def padded_hw(self) -> Tuple[int, int]:
        return tuple(self.in_hw[d] + sum(self.padding[d]) for d in (0, 1))


def _geometry(x_shape, kernel_shape, strides, padding) -> _Geometry:
    kh, kw = kernel_shape[:2]
    h, w = x_shape[1:3]
    out = (_out_size(h, kh, strides[0], padding[0]), _out_size(w, kw, strides[1], padding[1]))
    return _Geometry((kh, kw), strides, padding, (h, w), out)


def _pad_input(x: Array, geo: _Geometry) -> Array:
    return jnp.pad(x, ((0, 0), geo.padding[0], geo.padding[1], (0, 0)))


def _is_bf16(x: Array) -> bool:
    return jnp.dtype(x.dtype) == jnp.bfloat16


def _dot(a: Array, b: Array, contract_a: int = 1) -> Array:
    """``a @ b`` (``contract_a=0``: ``a.T @ b``), accumulated in float32 at least: bf16 stays
    accurate and float64 (``jax_enable_x64``) stays float64."""
    acc = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    if contract_a == 0 and _is_bf16(a):
        # A bf16 row-major copy of a.T, then a plain product: XLA:CPU runs a bf16 product with
        # its bf16 instructions only when both operands are row-major; a transposed operand (or
        # a.T itself, whose lowering is the same data in column-major layout, even behind a
        # barrier) makes it convert both operands to float32 first. The barrier keeps the
        # [m, 1, c] -> [c, m, 1] transpose's layout, so the reshape after it is the copy.
        # (rows, a's columns, b's columns; AMD AVX-512 host, 2026-12-06, medians of 11, ms;
        # transposed-operand product / a.T behind a barrier / this): (50176, 64, 256) 20.0 /
        # 20.9 / 13.3, (12544, 512, 128) 21.1 / 15.8 / 9.4, (12544, 128, 512) 15.1 / 18.6 / 7.1,
        # (3136, 1024, 256) 15.9 / 20.8 / 10.8.
        # The narrower operand is the one copied (b.T @ a, then the small result transposed):
        # 1.03-2.0x faster where b has fewer columns, the same sums (Intel AMX host, family 6
        # model 167, 2026-12-07, medians of 9, ms, copy of a.T -> of b.T: (50176, 256, 64) 6.6
        # -> 3.6, (12544, 512, 128) 3.7 -> 2.6, (3136, 1024, 256) 2.4 -> 1.7, (3136, 832, 32)
        # 0.93 -> 0.47, (784, 2048, 512) 2.2 -> 2.1; but (50176, 64, 256) 4.1 -> 6.5). bf16 train
        # steps (batch 16, A/B in both build orders, ms): densenet121 1,454 -> 1,368 and 1,453 ->
        # 1,378, resnet50 1,320 -> 1,277 and 1,355 -> 1,312, googlenet level (672 / 677, 690 /
        # 694).
        # Only where the copy saves more than the result's transpose costs: a classifier's
        # weight gradient (16 rows into 9,216 x 4,096) would transpose a 151 MB result to copy
        # 164 KB less.
        (m, c), o = a.shape, b.shape[1]
        if o < c and (c - o) * m > 2 * c * o:
            return _dot(b, a, contract_a=0).T
        a_t = jax.lax.optimization_barrier(a.reshape(m, 1, c).transpose(2, 0, 1)).reshape(c, m)
        # The product's result stays row-major too (behind a barrier): a caller's transpose
        # folded into its layout would leave it to a kernel without bf16 products.
        return jax.lax.optimization_barrier(jax.lax.dot_general(
            a_t, b, (((1,), (0,)), ((), ())), preferred_element_type=acc))
    return jax.lax.dot_general(a, b, (((contract_a,), (0,)), ((), ())), preferred_element_type=acc)


def _tap_windows(x: Array, geo: _Geometry) -> List[Array]:
    """The live taps' strided windows of the zero-padded input, each ``[N, Ho, Wo, C]``."""
    n, c = x.shape[0], x.shape[-1]
    xp = _pad_input(x, geo)
    return [jax.lax.slice(xp, *geo.tap_window(i, j, n, c)) for i, j in geo.live_taps]


def _patches(x: Array, geo: _Geometry) -> Array:
    """im2col: the live taps' strided input windows side by side, ``[N*Ho*Wo, taps*C]``."""
    windows = _tap_windows(x, geo)
    return concatenate(windows, axis=-1).reshape(-1, len(windows) * x.shape[-1])


def _live_kernel(kernel: Array, geo: _Geometry) -> Array:
    """The kernel's live taps as one ``[taps*C, O]`` matrix (rows in ``_patches``' order)."""
    kh, kw, c, o = kernel.shape
    live = geo.live_taps
    if len(live) == kh * kw:
        return kernel.reshape(-1, o)
    return stack([kernel[i, j] for i, j in live]).reshape(-1, o)


def _taps_forward(x: Array, kernel: Array, geo: _Geometry) -> Array:
    """The convolution as one matmul of the im2col patches (small outputs: the copy is small)."""
    n, o = x.shape[0], kernel.shape[-1]
    y = _dot(_patches(x, geo), _live_kernel(kernel, geo))
    return y.reshape((n,) + geo.out_hw + (o,)).astype(x.dtype)


def _taps_input_grad(g: Array, kernel: Array, geo: _Geometry, x_shape, dtype) -> Array:
    """Transpose of ``_taps_forward`` in x: g @ kernel.T, each tap's slice padded back in place."""
    n, c, o = x_shape[0], x_shape[-1], kernel.shape[-1]
    (sh, sw), (hp, wp) = geo.strides, geo.padded_hw()
    live = geo.live_taps
    dpatches = _dot(g.reshape(-1, o), _live_kernel(kernel, geo).T)
    dpatches = dpatches.reshape((n,) + geo.out_hw + (len(live), c))
    dxp = 0
    for k, (i, j) in enumerate(live):
        _, limit, _ = geo.tap_window(i, j, n, c)
        t = dpatches[..., k, :]
        dxp = dxp + jax.lax.pad(t, jnp.zeros((), t.dtype),
                                ((0, 0, 0), (i, hp - limit[1], sh - 1), (j, wp - limit[2], sw - 1),
                                 (0, 0, 0)))
    (t0, _), (l0, _) = geo.padding
    h, w = geo.in_hw
    return dxp[:, t0:t0 + h, l0:l0 + w].astype(dtype)


# Below this many input channels the weight gradient is one matmul over im2col patches (the
# stem: 3 channels); above, one matmul per kernel tap reads the input without a k*k-fold copy.
_IM2COL_MAX_CHANNELS = 16
# At or below this many output positions (7x7) the forward pass, the input gradient and the weight
# gradient are each one matmul over the im2col patches (the copy is at most 9 x 49 positions per
# image): XLA:CPU's convolution is 10-30x slower than them at 2x2 and 1x1 (the last stages of
# networks run on 32 px inputs), and no faster at 7x7. One matmul rather than one per tap keeps
# the program small (resnet152's forward at 32 px compiles in half the time).
_TAPS_MAX_OUTPUT_POSITIONS = 49


# Below this many input x output channels (64 x 64) a weight gradient with more than 7x7 output
# positions is XLA's own (a convolution over the batch): each tap's product is then too small to pay
# for its slice, and the per-tap products doubled the train step of the experiments' narrow
# networks (resnet20 at widths 8-16-32, batch 16: 45 -> 22 ms; DenseNet-BC-52 k=6: 176 -> 121 ms),
# while at 64 x 64 and above they win (resnet50 at 224 px: 4.4 s against 5.0 s with XLA's).
# Stems (at most 4 input channels) keep im2col: XLA's weight gradient of the 7x7 stride-2 stem was
# 1.3x its input gradient and 3x its forward (issue 10). Strided stems no longer come here (conv2d
# computes them by space-to-depth); the stride-1 ones do (VGG's and the CIFAR nets' first 3x3).
_TAPS_MIN_KERNEL_CHANNELS = 64 * 64
_STEM_MAX_CHANNELS = 4


def _xla_weight_grad(x: Array, g: Array, kernel_shape, geo: _Geometry) -> Array:
    _, vjp = jax.vjp(lambda k: _xla_conv(x, k, geo.strides, geo.padding),
                     jnp.zeros(kernel_shape, x.dtype))
    return vjp(g)[0]


def _taps_weight_grad(x: Array, g: Array, kernel_shape, geo: _Geometry) -> Array:
    """d(conv)/d(kernel) as matrix products: per tap, (strided input window).T @ g."""
    kh, kw, c, o = kernel_shape
    if (c * o < _TAPS_MIN_KERNEL_CHANNELS and c > _STEM_MAX_CHANNELS
            and not _small_output(geo)):
        return _xla_weight_grad(x, g, kernel_shape, geo)
    g2 = g.reshape(-1, o)
    live = geo.live_taps
    if c < _IM2COL_MAX_CHANNELS or _small_output(geo):
        per_tap = _dot(_patches(x, geo), g2, contract_a=0).reshape(-1, c, o)
    else:
        per_tap = jnp.stack([_dot(t.reshape(-1, c), g2, contract_a=0)
                             for t in _tap_windows(x, geo)])
    if len(live) == kh * kw:
        return per_tap.reshape(kernel_shape)
    dw = jnp.zeros(kernel_shape, per_tap.dtype)  # taps that only ever see padding
    for k, (i, j) in enumerate(live):
        dw = dw.at[i, j].set(per_tap[k])
    return dw


# At or below this ratio of output to input channels (DenseNet's 4k -> k bottleneck 3x3 conv),
# with at least _TAPS_MIN_KERNEL_CHANNELS input x output channels, a stride-1 convolution's
# gradients are matrix products over the im2col patches of the output gradient (k*k*O channels,
# a quarter or less of the input's k*k*C): one product for the input gradient, one for the weight
# gradient.
_GRAD_PATCHES_MAX_OUT_IN_RATIO = 0.25


def _narrowing(c: int, o: int) -> bool:
    """At most a quarter as many outputs as inputs (DenseNet's growth convolutions)."""
    return o <= _GRAD_PATCHES_MAX_OUT_IN_RATIO * c


def _use_grad_patches(kernel_shape, geo: _Geometry) -> bool:
    c, o = kernel_shape[2:]
    return (geo.strides == (1, 1) and _narrowing(c, o)
            and c * o >= _TAPS_MIN_KERNEL_CHANNELS and not _small_output(geo))


def _shifted_grad_windows(g: Array, kernel_hw: Tuple[int, int], geo: _Geometry,
                          axes: Tuple[int, int] = (1, 2)) -> List[Array]:
    """``g`` (a stride-1 convolution's output gradient, rows and columns on ``axes``) shifted by
    each kernel tap, in (i, j) order: window (i, j) at input position (h, w) holds
    ``g[h + top - i, w + left - j]``, zero outside ``g``."""
    kh, kw = kernel_hw
    (top, _), (left, _) = geo.padding
    (h, w), (ho, wo) = geo.in_hw, geo.out_hw
    config = [(0, 0, 0)] * g.ndim
    config[axes[0]] = (kh - 1 - top, h + top - ho, 0)
    config[axes[1]] = (kw - 1 - left, w + left - wo, 0)
    gp = jax.lax.pad(g, jnp.zeros((), g.dtype), config)

    def window(i: int, j: int) -> Array:
        start, limit = [0] * g.ndim, list(gp.shape)
        start[axes[0]], limit[axes[0]] = kh - 1 - i, kh - 1 - i + h
        start[axes[1]], limit[axes[1]] = kw - 1 - j, kw - 1 - j + w
        return jax.lax.slice(gp, start, limit)

    return [window(i, j) for i in range(kh) for j in range(kw)]


def _grad_patches_grads(x: Array, kernel: Array, g: Array, geo: _Geometry):
    """Input and weight gradients of a stride-1 convolution from the im2col patches of ``g``.

    With ``G[n, h, w, i, j] = g[n, h + top - i, w + left - j]`` (zero outside ``g``), both
    gradients are one matrix product each: ``dx = G @ kernel`` over (i, j, o) and
    ``dw[i, j] = x.T @ G[..., i, j, :]``.
    """
    kh, kw, c, o = kernel.shape
    windows = _shifted_grad_windows(g, (kh, kw), geo)
    patches = concatenate(windows, axis=-1).reshape(-1, kh * kw * o)
    dx = _dot(patches, kernel.transpose(0, 1, 3, 2).reshape(kh * kw * o, c))
    dw = _dot(x.reshape(-1, c), patches, contract_a=0).reshape(c, kh, kw, o).transpose(1, 2, 0, 3)
    return dx.reshape(x.shape).astype(x.dtype), dw


# Narrower still (DenseNet-BC's 4k -> k growth convolutions with k <= 16, fewer than 64 x 64
# channels), only the weight gradient changes: one product of the output gradient's shifted
# planes, channel-major ``[k*k*O, N*H*W]``, with the input ``[N*H*W, C]``. XLA's own weight
# gradient there transposes its input to put the batch in the channels and then runs a convolution
# over it, 4x its forward (DenseNet-BC-34 k = 8, 32 -> 8 at 32x32, batch 16, one core: 2.3 +
# 2.9 ms per layer, a quarter of the train step); the im2col products of _grad_patches_grads
# contract over the row-major patches (XLA's slower transposed-operand product) and build them in
# two passes. The planes take one pass over g's k*k*O channels (a few MB), and the product's
# operands are in the order YNNPACK takes: the step 105.8 -> 89.8 ms (step buffers kept, see
# cnn_jax.hostmem; medians of 12 alternating chunks of 10, 2026-12-06). The input gradient stays
# XLA's transposed convolution (as fast as the forward pass here).
def _use_grad_planes(kernel_shape, geo: _Geometry) -> bool:
    c, o = kernel_shape[2:]
    return (geo.strides == (1, 1) and _narrowing(c, o)
            and c * o < _TAPS_MIN_KERNEL_CHANNELS and not _small_output(geo))


def _grad_planes_weight_grad(x: Array, g: Array, kernel_shape, geo: _Geometry) -> Array:
    """The weight gradient of a stride-1 convolution as one product of ``g``'s shifted planes.

    ``G[i, j, o, (n, h, w)] = g[n, h + top - i, w + left - j, o]`` (zero outside ``g``), and
    ``dw[i, j] = (G[i, j] @ x).T`` over the positions (n, h, w).
    """
    kh, kw, c, o = kernel_shape
    # g's O channels move to the front once, before the k*k-fold copy (not after it).
    planes = stack(_shifted_grad_windows(jnp.transpose(g, (3, 0, 1, 2)), (kh, kw), geo,
                                         axes=(2, 3)))
    dw_t = _dot(planes.reshape(kh * kw * o, -1), x.reshape(-1, c))
    return dw_t.reshape(kh, kw, o, c).transpose(0, 1, 3, 2)


def _small_output(geo: _Geometry) -> bool:
    return geo.out_hw[0] * geo.out_hw[1] <= _TAPS_MAX_OUTPUT_POSITIONS


# XLA:CPU hands float32 convolutions to YNNPACK, which runs one with at most 64 output channels on
# a single thread (it splits the work by blocks of output channels): at 56x56, 64 -> 64, batch 16
# it takes 47 ms on two cores and 49 on one, where XLA's own (Eigen) convolution takes 27 ms on
# two; densenet121's 128 -> 32 at 56x56: 53 against 34 ms. YNNPACK declines a convolution whose
# output is larger than its input (xla/backends/cpu/ynn_support.cc), so a stride-1 convolution
# computed with one more output row than the input has, sliced off after, runs on Eigen. With more
# output channels YNNPACK is as fast or faster (28x28, 128 -> 128: 27 against 29 ms), and with
# at most 16 input and output channels it declines them itself.
_EIGEN_MAX_OUTPUT_CHANNELS = 64
_YNN_MIN_CHANNELS = 17


def _use_eigen(kernel_shape, strides, dtype) -> bool:
    c, o = kernel_shape[2:]
    return (strides == (1, 1) and jnp.dtype(dtype) == jnp.float32 and not _one_thread()
            and o <= _EIGEN_MAX_OUTPUT_CHANNELS and max(c, o) >= _YNN_MIN_CHANNELS)


# A process on one core (each worker of experiments/run.py pins itself to one): XLA:CPU runs every
# op on one thread, and YNNPACK's single-threaded convolutions beat Eigen's at every stride-1 size
# measured, so the Eigen detour above is not taken. The ones YNNPACK declines (at most 16 input and
# output channels) run on it too, with their input channels zero-padded to 24 (17 and 32 were
# slower). One core of the AVX-512 host, batch 16, forward ms, XLA's -> this (2026-12-05, medians
# of 7): 8 -> 8 at 32x32 1.11 -> 0.79, 16 -> 16 at 16x16 0.43 -> 0.25, 3 -> 8 at 32x32 1.23 ->
# 0.74, 32 -> 8 at 32x32 (DenseNet-BC's growth) 2.83 -> 0.81, 64 -> 64 at 56x56 33.1 -> 24.4.
# On two cores Eigen's threads win both kinds (8 -> 8: 0.68 against 0.88 padded), hence one
# thread only.
_ONE_THREAD_PAD_CHANNELS = 24


def _one_thread() -> bool:
    """Whether XLA:CPU has one thread here: this process may run on one CPU core only (XLA sizes
    its pool by the cores the process may use)."""
    try:
        return len(os.sched_getaffinity(0)) == 1
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() == 1


def _pad_for_ynn(x: Array, kernel: Array) -> Tuple[Array, Array]:
    """With one thread, a float32 convolution YNNPACK would decline gets zero input channels
    (the same sums plus zeros) so that it takes it."""
    c, o = kernel.shape[2:]
    if (jnp.dtype(x.dtype) != jnp.float32 or max(c, o) >= _YNN_MIN_CHANNELS
            or not _one_thread()):
        return x, kernel
    extra = _ONE_THREAD_PAD_CHANNELS - c
    return (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))),
            jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0))))


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional
# Neural Networks"): each 2x2 block of outputs from its 4x4 input tile with 16 multiplications per
# channel pair instead of 36, as 16 matrix products over the tiles. XLA:CPU's convolutions of many
# channels run at about two thirds of torch's oneDNN forward; the 2.25x fewer products more than
# pay for the tile transforms. Forward, batch 16, median of 5 alternating on the 2-core AVX2 host
# (2026-12-05, slow hour): AlexNet's 192 -> 384 at 13x13 114 -> 70 ms (torch 74), ResNet-50's
# 256 -> 256 at 14x14 106 -> 58 (torch 80), 128 -> 128 at 28x28 135 -> 79 (torch 114), VGG's
# 512 -> 512 at 28x28 (batch 8) 773 -> 430 (torch 640); errors ~2e-6 of the output's scale. At
# 64 x 64 channels and fewer (the Eigen path above) or 32 outputs (DenseNet's growth convolutions)
# the transforms' memory traffic costs more than the products save (64 -> 64 at 56x56: 99 -> 101,
# 128 -> 32 at 56x56: 114 -> 141). float32 only: bfloat16 has its own rule (_use_winograd_bf16,
# with the transforms in float32).
#
# 5x5 convolutions by F(2x2, 5x5) under the same channel rule, at any map size (2.8x fewer
# products, where 3x3's F(2x2) saves 2.25x): AlexNet's 64 -> 192 at 27x27, batch 16, float32
# (AMD AVX-512 host, 2026-12-06, medians of 7; XLA's convolution / per-tap weight gradient ->
# Winograd's), ms: forward 49.6 -> 27.5, weight gradient 49.2 -> 29.8, and its input gradient
# (the 192 -> 64 convolution of the flipped kernel) 42.6 -> 28.7; errors 2-4e-6 of the output's
# scale (as F(4x4, 3x3)). GoogLeNet's paper-layout 5x5s (16 -> 32 at 28x28, 32 -> 64 at 14x14)
# are too narrow: 2.5 -> 5.5 and 3.4 -> 4.2 ms forward. With its transformed tiles rounded to
# bf16 (as _use_winograd_bf16's 3x3s) the output's relative error was 2.8e-2 against 1.7e-3 for
# the float32 convolution rounded to bf16, so bfloat16 5x5s run in float32 (_in_float32), by this.
_WINOGRAD_MIN_KERNEL_CHANNELS = 64 * 64 + 1
_WINOGRAD_MIN_CHANNELS = 32


def _use_winograd(kernel_shape, dtype) -> bool:
    kh, kw, c, o = kernel_shape
    return ((kh, kw) in ((3, 3), (5, 5)) and jnp.dtype(dtype) == jnp.float32
            and c * o >= _WINOGRAD_MIN_KERNEL_CHANNELS and min(c, o) >= _WINOGRAD_MIN_CHANNELS)


# On a CPU with AVX-512 the forward and input gradient were XLA's below 28x28 outputs until
# 2026-12-06 (from 7e94c37 only above 384 x 256 channels): XLA -> F(2x2, 3x3) had measured
# 35 -> 53 ms for vgg16's 512 -> 512 at 14x14 (batch 8), 23.9 -> 34.8 for alexnet's 384 -> 256
# at 13x13. Those Winograd times included the kernel transforms as einsum products (12-35 ms per
# layer, see _two_sided). With the transforms as sums Winograd is faster at every size measured
# (XLA -> Winograd, forward ms, batch 16, medians of 3 x 9, AMD AVX-512 host): 13x13 192 -> 384
# 20.4 -> 18.3, 384 -> 192 27.1 -> 19.9, 384 -> 256 28.7 -> 22.8, 256 -> 384 29.4 -> 21.8,
# 256 -> 256 19.9 -> 17.6; 14x14 256 -> 256 21.6 -> 15.3, 160 -> 320 19.5 -> 15.5, vgg16's
# 512 -> 512 (batch 8) 42.7 -> 21.2; so the rule is gone. Whole steps, A/B with torch's as a
# third arm, both build orders, ms, train / eval, the rule -> without it (torch): with the 384 x
# 256 exception (einsum transforms), alexnet 473 -> 416 and 452 -> 415 (422, 433) / 149 -> 143
# and 144 -> 129, resnet50 2,510 -> 2,495 and 2,536 -> 2,420 / 796 -> 747 and 774 -> 740,
# googlenet 1,097 -> 1,047 and 1,099 -> 1,123; then vgg16 (batch 8, its 14x14s, sums) 3,074 ->
# 3,073 and 3,035 -> 2,992 (3,950, 3,878) / 898 -> 846 and 949 -> 888.


# bfloat16 on a CPU with AVX-512 BF16 (where bf16 products run at twice the float32 rate, see
# _matmul): Winograd's F(2x2, 3x3) with the tile transforms in float32 and only the products'
# operands rounded to bf16 (accumulated in float32), forward and input gradient, from 8x8 outputs
# (smaller ones are one im2col product) and ahead of _use_taps_bf16 (Winograd is as fast at
# 14x14 and faster at 13x13); the weight gradient stays float32's (see _in_float32). Against XLA's
# bf16 convolution (2-core AMD AVX-512 host, 2026-12-06, medians of 7), ms: 128 -> 128 at 28x28,
# batch 16, 20.1 -> 9.8; 256 -> 256 at 14x14 20.5 -> 11.3; vgg16's 512 -> 512 at 28x28 (batch 8)
# 153.9 -> 74.3. Whole bf16 steps against the float32 Winograd it replaces (A/B, both build orders, train
# / eval ms): vgg16 (batch 8) 3,855 -> 3,442 and 3,792 -> 3,457 / 972 -> 788 and 922 -> 755;
# googlenet 895 -> 860 and 1,022 -> 982 / 269 -> 250 and 250 -> 226; resnet50 2,215 -> 2,134 and
# 2,368 -> 2,341; alexnet's train step level, eval 150 -> 136. The price is one more bf16
# rounding, of the transformed tiles: against the float32 convolution of the same bf16 operands
# the mean error is ~3x that of XLA's bf16 convolution (whose error is mostly its output's own
# rounding) and the largest ~2x (~5e-3 of the output's scale). Whole-network gradients of one
# batch in bf16 against float32's (relative L2 error, bf16 with -> without it): vgg11 at 64 px
# 0.090 against 0.067, resnet18 at 112 px 0.386 against 0.379, alexnet 0.077 against 0.078.
_cpu_has_avx512_bf16 = host.has_avx512_bf16


# From 64 x 64 channels (float32's Winograd: more than that), as the bf16 products halve the
# part the transforms do not touch; float32 (what bf16 ran in) -> this, forward ms: 64 -> 64 at
# 56x56, batch 16, 22.8 -> 12.1; vgg16's at 224x224, batch 8, 175.1 -> 124.7; 32 -> 128 at 56x56
# 40.0 -> 15.2. DenseNet's 128 -> 32 is kn2row's (_use_kn2row_bf16: as fast at 28x28 and 56x56,
# 1.14 against 1.63 ms at 14x14).
_WINOGRAD_BF16_MIN_KERNEL_CHANNELS = 64 * 64


def _use_winograd_bf16(kernel_shape, dtype) -> bool:
    """bfloat16 3x3 convolutions of at least 64 x 64 channels (and 32 each), on a CPU with
    AVX-512 BF16."""
    kh, kw, c, o = kernel_shape
    return ((kh, kw) == (3, 3) and jnp.dtype(dtype) == jnp.bfloat16
            and c * o >= _WINOGRAD_BF16_MIN_KERNEL_CHANNELS
            and min(c, o) >= _WINOGRAD_MIN_CHANNELS and _cpu_has_avx512_bf16())


def _use_winograd_forward(kernel_shape, dtype) -> bool:
    """Whether a stride-1 convolution's forward (and input gradient, both computed by
    ``_conv_stride1``) is Winograd's: ``_use_winograd``, or in bfloat16 ``_use_winograd_bf16``."""
    return _use_winograd_bf16(kernel_shape, dtype) or _use_winograd(kernel_shape, dtype)


# The weight gradient gains more than the forward: per-tap products are XLA:CPU's slowest pass
# of a convolution, and the transposed algorithm's output-gradient transforms are cheap. On the
# 2-core AVX-512 host (2026-12-05; batch 16, median of 7), per-tap products -> F(3x3, 2x2) ->
# F(3x3, 4x4), ms: 64 -> 64 at 8x8 (batch 64) 5.0 -> 3.1 -> 2.9, 14x14 5.1 -> 2.5 -> 3.0,
# 28x28 18.3 -> 9.6 -> 6.8, 56x56 105 -> 70 -> 49; 128 -> 128 at 28x28 38 -> 26 -> 22;
# 256 -> 256 at 14x14 24 -> 15 -> 19; VGG's 512 -> 512 at 28x28 (batch 8) 162 -> 97 -> 85. So
# the weight gradient is Winograd's at 64 x 64 channels too (from 14x14 outputs: at 8x8 the gain
# is small; smaller maps where the sums are many, below), by
# F(3x3, 4x4) from 28x28 outputs, and below that where the outputs are whole 4x4 tiles: at 14x14
# (16x16 computed) F(3x3, 2x2) is faster, at 16x16 and 8x8 F(3x3, 4x4) (Intel AMX host, family 6
# model 167, 2026-12-07, medians of 9, ms, F(3x3, 2x2) -> F(3x3, 4x4): 128 -> 128 at 16x16, batch
# 16, 4.6 -> 3.8, batch 64 21.2 -> 16.5; 256 -> 256 at 8x8, batch 64, 13.4 -> 11.2; at 14x14,
# batch 16, 256 -> 256 10.5 -> 12.2, 160 -> 320 7.0 -> 8.7).
_WINOGRAD_WGRAD_MIN_CHANNELS = 64
_WINOGRAD_WGRAD_MIN_POSITIONS = 14 * 14
_WINOGRAD_F4_MIN_POSITIONS = 28 * 28
# Narrower or smaller 3x3s too, where the product sums are many: XLA's own weight gradient (which
# the narrow ones took, see _taps_weight_grad) slows down far more than its work grows, per-tap
# products (64 x 64 at 8x8) are no faster. Batch N, N*Ho*Wo*C*O multiply-adds per tap, from 2^24;
# not DenseNet's narrowing growth convolutions (at most a quarter as many outputs as inputs), whose
# output-gradient patches and planes are as fast. Intel AMX host (family 6 model 167, 2026-12-07,
# medians of 9), weight gradient alone, ms, XLA's (or per-tap) -> this: googlenet's 32 -> 96 at
# 28x28 (batch 16) 16.0 -> 3.4, 16 -> 32 at 56x56 14.1 -> 5.0; resnet20's 16 -> 16 at 32x32
# (batch 128) 22.4 -> 12.6, 32 -> 32 at 16x16 19.1 -> 6.4, 64 -> 64 at 8x8 10.3 -> 3.4; on one
# core (experiments/run.py's workers) 24.3 -> 24.7, 19.5 -> 13.3, 12.9 -> 5.9. Below 2^24 neither
# wins throughout (16 -> 16 at 32x32, batch 32: 3.0 -> 2.7 on two cores, 2.7 -> 3.9 on one).
_WINOGRAD_WGRAD_MIN_SUMS = 1 << 24


def _winograd_weight_grad_tile(kernel_shape, dtype, geo: _Geometry, batch: int) -> int:
    """m of the F(r x r, m x m) that computes this convolution's (r x r) weight gradient, for a
    batch of ``batch`` images; 0: not by Winograd's algorithm. 5x5s: m = 2."""
    c, o = kernel_shape[2:]
    positions = geo.out_hw[0] * geo.out_hw[1]
    if geo.strides != (1, 1) or _small_output(geo):
        return 0
    float32_3x3 = kernel_shape[:2] == (3, 3) and jnp.dtype(dtype) == jnp.float32
    wide = (float32_3x3 and min(c, o) >= _WINOGRAD_WGRAD_MIN_CHANNELS
            and positions >= _WINOGRAD_WGRAD_MIN_POSITIONS)
    many = (float32_3x3 and isinstance(batch, int)  # a symbolic batch (jax.export): not counted
            and batch * positions * c * o >= _WINOGRAD_WGRAD_MIN_SUMS
            and not _narrowing(c, o))
    if not (wide or many or _use_winograd(kernel_shape, dtype)):
        return 0
    if kernel_shape[0] == 5:
        return 2
    whole_tiles = all(d % 4 == 0 for d in geo.out_hw)  # no 4x4 tile cropped
    return 4 if positions >= _WINOGRAD_F4_MIN_POSITIONS or whole_tiles else 2


# Winograd's F(m x m, r x r) as (B^T, G, A^T), keyed (m, r) (Lavin & Gray 2016; points 0, 1, -1
# and 0, +-1, +-2, with the point at infinity): an input tile of m + r - 1 rows, V = B^T d B; the
# kernel's U = G g G^T; outputs A^T (V * U) A. F(4x4, 3x3) needs 36 products per 16 outputs where
# F(2x2, 3x3) needs 64, at errors ~10x larger (~4e-6 of the output's scale in float32 against
# ~3e-7). F(2x2, 5x5) shares F(4x4, 3x3)'s points, so its B^T: 36 products per 4 outputs where a
# 5x5 convolution needs 100.
_B6 = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINOGRAD = {
    (2, 3): (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
             ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
             ((1, 1, 1, 0), (0, 1, -1, -1))),
    (4, 3): (_B6,
             ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
              (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
             ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
              (0, 1, -1, 8, -8, 1))),
    (2, 5): (_B6,
             ((1 / 4, 0, 0, 0, 0), (-1 / 6,) * 5, (-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6),
              (1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3), (1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3),
              (0, 0, 0, 0, 1)),
             ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 1))),
}


def _combine(rows, parts: List[Array]) -> List[Array]:
    """``[sum_i rows[r][i] * parts[i] for r]``, without the zero terms and the products by +-1
    (XLA fuses each sum with the slices that make its parts)."""
    out = []
    for row in rows:
        total = None
        for coefficient, part in zip(row, parts):
            if not coefficient:
                continue
            if total is None:
                total = part if coefficient == 1 else -part if coefficient == -1 else \
                    part * coefficient
            elif abs(coefficient) == 1:
                total = total + part if coefficient == 1 else total - part
            else:
                total = total + part * coefficient
        out.append(total)
    return out


def _winograd_tiles(t: Array, axis: int, tiles: int, m: int, r: int) -> List[Array]:
    """B^T d along ``axis`` for every tile at once: the m + r - 1 rows of each tile (stride m, so
    neighbouring tiles share r - 1) combined by the rows of B^T."""
    d = [jax.lax.slice_in_dim(t, i, i + m * (tiles - 1) + 1, m, axis) for i in range(m + r - 1)]
    return _combine(_WINOGRAD[m, r][0], d)


def _winograd_output_tiles(t: Array, axis: int, tiles: int, m: int, r: int) -> List[Array]:
    """A g along ``axis`` for every m-row tile of an output gradient (A = the transpose of A^T);
    for m = 2, r = 3: g0, g0 + g1, g0 - g1, -g1."""
    g = [jax.lax.slice_in_dim(t, i, i + m * (tiles - 1) + 1, m, axis) for i in range(m)]
    return _combine(tuple(zip(*_WINOGRAD[m, r][2])), g)


def _two_sided(rows, t: Sequence[Sequence[Array]]) -> List[List[Array]]:
    """``R t R^T`` for ``R`` = ``rows`` (p x q) and ``t`` a q x q grid of equal arrays, as a p x p
    grid: the kernel's G g G^T (``t[i][j]`` = tap (i, j)'s C x O matrix) and the weight
    gradient's G^T P G, by ``_combine`` (sums of scaled slices, fused) and not as an einsum,
    which XLA:CPU lowers to a product with 4 or 6 output columns over C*O*q rows: 12.3 ms
    against 1.0 for a 3x3 256 -> 256 kernel, 17.4 against 1.1 for 384 -> 256 (AMD AVX-512 host,
    2026-12-06, medians of 9), once per Winograd layer for the forward, the input gradient and
    the weight gradient each."""
    cols = [_combine(rows, [t[i][j] for i in range(len(t))]) for j in range(len(t))]
    return [_combine(rows, [cols[j][p] for j in range(len(t))]) for p in range(len(rows))]


def _winograd_input(x: Array, padding: Padding, m: int, r: int
                    ) -> Tuple[Array, Tuple[int, int], Tuple[int, int]]:
    """The input padded (or cropped) to exactly the m * tiles + r - 1 rows and columns that the
    tiles read, the output size and the tiles per dimension (m x m outputs each)."""
    _, h, w, _ = x.shape
    (top, bottom), (left, right) = padding
    ho, wo = h + top + bottom - r + 1, w + left + right - r + 1
    th, tw = -(-ho // m), -(-wo // m)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (top, m * th + r - 1 - h - top, 0),
                      (left, m * tw + r - 1 - w - left, 0), (0, 0, 0)))
    return xp, (ho, wo), (th, tw)


def _winograd_conv(x: Array, kernel: Array, padding: Padding, m: int = 2) -> Array:
    """A stride-1 r x r convolution (r = 3 or 5) by Winograd's F(m x m, r x r): V = B^T d B per
    input tile, U = G g G^T per kernel, (m + r - 1)^2 products V_ab @ U_ab over the tiles,
    outputs A^T M A."""
    n, c, o = x.shape[0], x.shape[-1], kernel.shape[-1]
    r = kernel.shape[0]
    a = m + r - 1
    # bfloat16 (_use_winograd_bf16): the transforms in float32, only the products' operands bf16
    transforms = jnp.float32 if _is_bf16(x) else x.dtype
    xp, (ho, wo), (th, tw) = _winograd_input(x.astype(transforms), padding, m, r)
    k = kernel.astype(transforms)
    u = _two_sided(_WINOGRAD[m, r][1], [[k[i, j] for j in range(r)] for i in range(r)])
    prods = [[_dot(v.astype(x.dtype).reshape(-1, c), u[i][j].astype(x.dtype)).astype(transforms)
              .reshape(n, th, tw, o)
              for j, v in enumerate(_winograd_tiles(rows, 2, tw, m, r))]
             for i, rows in enumerate(_winograd_tiles(xp, 1, th, m, r))]
    at = _WINOGRAD[m, r][2]
    cols = [_combine(at, [prods[i][j] for i in range(a)]) for j in range(a)]  # A^T M, by column
    # each block rounded to x's dtype before the stack (bfloat16: by ``stack``, as uint16 bits)
    y = stack([stack([t.astype(x.dtype) for t in _combine(at, [cols[j][p] for j in range(a)])],
                     axis=3)
               for p in range(m)], axis=2)  # [n, th, m, tw, m, o]: the blocks back in place
    return y.reshape(n, m * th, m * tw, o)[:, :ho, :wo]


def _winograd_weight_grad(x: Array, g: Array, padding: Padding, m: int, r: int) -> Array:
    """The weight gradient of a stride-1 r x r convolution by F(r x r, m x m), Winograd's
    algorithm transposed: dw = G^T [sum over tiles (B^T d B) (A g A^T)] G, as (m + r - 1)^2
    products over the tiles: fewer multiplications than one product per tap (2.25x for m = 2 and
    r = 3, 4x for m = 4; 2.8x for m = 2 and r = 5), and no per-tap copies of the input. Errors
    ~1e-6 to 1e-5 of the gradient's scale, from the long sums over the tiles."""
    c, o = x.shape[-1], g.shape[-1]
    a = m + r - 1
    xp, (ho, wo), (th, tw) = _winograd_input(x, padding, m, r)
    gp = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (0, m * th - ho, 0),
                                                 (0, m * tw - wo, 0), (0, 0, 0)))
    v = [_winograd_tiles(rows, 2, tw, m, r) for rows in _winograd_tiles(xp, 1, th, m, r)]
    w = [_winograd_output_tiles(rows, 2, tw, m, r)
         for rows in _winograd_output_tiles(gp, 1, th, m, r)]
    prods = [[_dot(v[i][j].reshape(-1, c), w[i][j].reshape(-1, o), contract_a=0)
              for j in range(a)] for i in range(a)]  # a x a of [C, O]
    dw = _two_sided(tuple(zip(*_WINOGRAD[m, r][1])), prods)  # G^T P G
    return jnp.stack([jnp.stack(row) for row in dw])


# bfloat16 at small maps: XLA:CPU's bf16 convolutions run at its float32 speed, while its bf16
# matrix products with float32 accumulation use AVX-512 BF16's instructions where the CPU has them
# (twice the float32 rate on the AMD AVX-512 host) and are no slower elsewhere. Up to 14x14
# outputs one product per tap, summed in float32, beats XLA's bf16 convolution (the same exact
# products and float32 sums; batch 16, medians of 7, AMD AVX-512 host, 2026-12-06), ms: 256 ->
# 256 at 14x14 19.7 -> 11.7, 384 -> 256 at 13x13 27.2 -> 15.4, 128 -> 256 at 14x14 10.0 -> 6.8,
# vgg16's 512 -> 512 (batch 8) 40.5 -> 20.5, 192 -> 384 at 13x13 21.1 / 21.3; at 28x28 it loses
# (128 -> 128: 23.8 -> 33.9). Wider than 64 x 64 channels, as measured (as Winograd's rule).
_TAPS_BF16_MAX_POSITIONS = 14 * 14


def _use_taps_bf16(kernel_shape, dtype, geo: _Geometry) -> bool:
    c, o = kernel_shape[2:]
    return (jnp.dtype(dtype) == jnp.bfloat16 and c * o >= _WINOGRAD_MIN_KERNEL_CHANNELS
            and geo.out_hw[0] * geo.out_hw[1] <= _TAPS_BF16_MAX_POSITIONS)


def _taps_sum_forward(x: Array, kernel: Array, geo: _Geometry) -> Array:
    """The convolution as one product per live tap over its strided input window, summed."""
    n, c, o = x.shape[0], x.shape[-1], kernel.shape[-1]
    y = functools.reduce(jnp.add, [_dot(t.reshape(-1, c), kernel[i, j])
                                   for t, (i, j) in zip(_tap_windows(x, geo), geo.live_taps)])
    return y.reshape((n,) + geo.out_hw + (o,)).astype(x.dtype)


# bfloat16 convolutions that no bf16 formulation here computes faster run in float32: XLA:CPU's
# own bf16 convolutions run at its float32 speed at best and far below it for the stems (batch 16
# on the AMD AVX-512 host, 2026-12-06, forward / forward with the weight gradient, ms: resnet50's
# 7x7/2 stem 139 / 302 in bf16 against 32 / 74 in float32; 3x3 64 -> 64 at 56x56 38 / 129
# against 22 / 63, with both gradients; 128 -> 128 at 28x28 20 / 74 against 13 / 38). The
# float32 convolution of the bf16 operands, rounded once to bf16, is also the more accurate one.
# Their weight gradients too (the float32 ones are Winograd's).
def _in_float32(f: Callable, x: Array, kernel: Array, *args) -> Array:
    """``f(x, kernel, *args)`` computed in float32 and rounded back to ``x``'s dtype."""
    return f(x.astype(jnp.float32), kernel.astype(jnp.float32), *args).astype(x.dtype)


# bfloat16 with at most a quarter as many outputs as inputs (DenseNet's 4k -> k growth
# convolutions), on a CPU with AVX-512 BF16: kn2row, one product of the input with all taps'
# kernels side by side (C -> k*k*O, bf16 operands, float32 results), then each tap's output plane
# shifted into place and summed in float32. Its one product has k*k*O columns where a per-tap
# product has O (32), and its output is O/C of im2col's copy. The same products as XLA's, summed
# in another order. 128 -> 32, batch 16 (AMD AVX-512 host, 2026-12-06, medians of 7), forward
# ms, float32 (what bf16 ran in, see _in_float32) -> this: 56x56 27.9 -> 17.0, 28x28 8.3 -> 4.5,
# 14x14 2.2 -> 1.4. In float32 the product runs at half the rate and kn2row lost (issue 10).
def _use_kn2row_bf16(kernel_shape, dtype, geo: _Geometry) -> bool:
    return (jnp.dtype(dtype) == jnp.bfloat16 and _use_grad_patches(kernel_shape, geo)
            and _cpu_has_avx512_bf16())


def _kn2row_forward(x: Array, kernel: Array, geo: _Geometry) -> Array:
    """A stride-1 convolution as one product ``x @ [kernel taps side by side]`` whose per-tap
    output planes, shifted by their taps, sum to the output (kn2row)."""
    n, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = geo.out_hw
    taps = _dot(x.reshape(-1, c), kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * o))
    taps = jax.lax.pad(taps.reshape(n, h, w, kh * kw, o), jnp.zeros((), taps.dtype),
                       ((0, 0, 0), (*geo.padding[0], 0), (*geo.padding[1], 0), (0, 0, 0),
                        (0, 0, 0)))
    y = functools.reduce(jnp.add, [taps[:, i:i + ho, j:j + wo, i * kw + j]
                                   for i in range(kh) for j in range(kw)])
    return y.astype(x.dtype)


def _conv_stride1(x: Array, kernel: Array, padding: Padding) -> Array:
    """A stride-1 convolution, by kn2row (bfloat16), Winograd, per-tap products (bfloat16 at
    small maps) or on XLA's Eigen convolution where ``_use_kn2row_bf16``,
    ``_use_winograd_forward``, ``_use_taps_bf16`` or ``_use_eigen`` says it is faster; other
    bfloat16 ones in float32."""
    geo = _geometry(x.shape, kernel.shape, (1, 1), padding)
    if _use_kn2row_bf16(kernel.shape, x.dtype, geo):
        return _kn2row_forward(x, kernel, geo)
    if _use_winograd_forward(kernel.shape, x.dtype):
        return _winograd_conv(x, kernel, padding)
    if _use_taps_bf16(kernel.shape, x.dtype, geo):
        return _taps_sum_forward(x, kernel, geo)
    if _is_bf16(x):
        return _in_float32(_conv_stride1, x, kernel, padding)
    if not _use_eigen(kernel.shape, (1, 1), x.dtype):
        return _xla_conv(*_pad_for_ynn(x, kernel), (1, 1), padding)
    (top, bottom), cols = padding
    h, kh = x.shape[1], kernel.shape[0]
    rows = h + top + bottom - kh + 1
    extra = max(0, h + 1 - rows)  # rows > h (a "full" convolution): YNNPACK declines it as is
    y = _xla_conv(x, kernel, (1, 1), ((top, bottom + extra), cols))
    return y[:, :rows]


def _xla_input_grad(g: Array, kernel: Array, x_shape, geo: _Geometry) -> Array:
    """The input gradient as XLA's transposed convolution; stride 1: the convolution of ``g``
    with the flipped kernel (so that ``_conv_stride1`` can pick the faster library)."""
    if geo.strides != (1, 1):
        if _is_bf16(g):
            return _in_float32(lambda g_, k_: _xla_input_grad(g_, k_, x_shape, geo), g, kernel)
        _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, geo.strides, geo.padding),
                               jnp.zeros(x_shape, g.dtype))
        return input_vjp(g)[0]
    kh, kw = geo.kernel_hw
    (top, bottom), (left, right) = geo.padding
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
    return _conv_stride1(g, flipped, ((kh - 1 - top, kh - 1 - bottom),
                                      (kw - 1 - left, kw - 1 - right)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_fast(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding) -> Array:
    geo = _geometry(x.shape, kernel.shape, strides, padding)
    if _small_output(geo):
        return _taps_forward(x, kernel, geo)
    if strides == (1, 1):
        return _conv_stride1(x, kernel, padding)
    if _is_bf16(x):
        return _in_float32(_xla_conv, x, kernel, strides, padding)
    return _xla_conv(x, kernel, strides, padding)


def _conv_fast_fwd(x, kernel, strides, padding):
    return _conv_fast(x, kernel, strides, padding), (x, kernel)


def _conv_fast_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    geo = _geometry(x.shape, kernel.shape, strides, padding)
    if _use_grad_patches(kernel.shape, geo):
        dx, dw = _grad_patches_grads(x, kernel, g, geo)
        return dx, dw.astype(kernel.dtype)
    if _small_output(geo):
        dx = _taps_input_grad(g, kernel, geo, x.shape, x.dtype)
    else:  # XLA's transposed convolution is as fast as the forward pass here
        dx = _xla_input_grad(g, kernel, x.shape, geo)
        if _is_bf16(x):  # the weight gradient below in float32 (see _in_float32)
            x, g = x.astype(jnp.float32), g.astype(jnp.float32)
    tile = _winograd_weight_grad_tile(kernel.shape, x.dtype, geo, x.shape[0])
    if tile:
        dw = _winograd_weight_grad(x, g, padding, tile, kernel.shape[0])
    elif _use_grad_planes(kernel.shape, geo):
        dw = _grad_planes_weight_grad(x, g, kernel.shape, geo)
    else:
        dw = _taps_weight_grad(x, g, kernel.shape, geo)
    return dx, dw.astype(kernel.dtype)


_conv_fast.defvjp(_conv_fast_fwd, _conv_fast_bwd)
# Jitted as a unit: outside jit (op by op) its dozen pads, slices and products compile as one
# program per geometry rather than one per op (GoogLeNet's eager forward: ~800 compiles), and under
# jit each geometry is traced once however often a network repeats it. XLA inlines the call.
_conv_fast_jit = jax.jit(_conv_fast, static_argnums=(2, 3))


def conv2d(x: Array, kernel: Array, strides: IntOrPair = 1, padding: Any = 0,
           groups: int = 1, float32_sums: bool = False) -> Array:
    """NHWC x HWIO convolution equal to ``lax.conv_general_dilated``; on CPU, 1x1 convolutions are
    matrix products, strided stems (at most 4 channels) stride-1 convolutions of input blocks,
    wide stride-1 3x3 convolutions Winograd's F(2x2, 3x3) (their weight gradients F(3x3, 2x2) or,
    from 28x28 outputs, F(3x3, 4x4)), wide 5x5s F(2x2, 5x5) (weight gradients F(5x5, 2x2)), and
    other weight gradients sums of per-tap matrix products;
    in bfloat16, products of bf16 operands accumulated in float32 (1x1s, Winograd's with float32
    transforms, kn2row for DenseNet's growth convolutions, per-tap products at small maps) where
    the CPU multiplies bf16 faster, else float32 rounded to bf16 (see the comments above each).

    ``padding``: torch's symmetric int (or pair), ``((lo, hi), (lo, hi))``, or ``'VALID'``.
    ``float32_sums``: a bf16 1x1 convolution on the CPU's fast path returns its float32 sums
    unrounded (for a batch norm that follows: ``Conv2d(float32_sums=True)``); elsewhere no effect.
    """
    strides = pair(strides)
    if isinstance(padding, str):
        if padding.upper() != "VALID":
            raise ValueError(f"padding {padding!r}: use torch-style integers or 'VALID'")
        padding = ((0, 0), (0, 0))
    elif isinstance(padding, int) or isinstance(padding[0], int):
        padding = torch_padding(padding)
    padding = tuple(tuple(p) for p in padding)
    kh, kw = kernel.shape[:2]
    if groups != 1:
        return _xla_conv(x, kernel, strides, padding, groups)
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        if use_fast_formulations("conv1x1"):
            return _conv1x1(x, kernel, strides, float32_sums)
        return _xla_conv(x, kernel, strides, padding)
    if not use_fast_formulations("conv"):
        return _xla_conv(x, kernel, strides, padding)
    if strides != (1, 1) and x.shape[-1] <= _STEM_MAX_CHANNELS:
        return _stem_space_to_depth(x, kernel, strides, padding)
    return _conv_fast_jit(x, kernel, strides, padding)


@functools.partial(jax.jit, static_argnums=(2, 3))  # one program op by op, as _conv_fast_jit
def _stem_space_to_depth(x: Array, kernel: Array, strides: Tuple[int, int],
                         padding: Padding) -> Array:
    """A strided stem (at most 4 input channels) as a stride-1 convolution of s x s input blocks.

    Each s x s block of the padded input becomes one position with s*s*C channels, and the kernel,
    zero-padded to a multiple of s taps, a ceil(k/s)-tap kernel over them (the space-to-depth of
    MLPerf's TPU ResNets); XLA's autodiff gives the weight gradient. XLA:CPU's convolutions of 3
    channels at stride 2 or 4 are slow, their weight gradients most (``python -m cnn_jax.benchmark
    --compare=torch --layers``, batch 16 at 224 px, forward and weight gradient: AlexNet's 11x11/4
    141 ms against torch's 54 before).
    """
    n, c, o = x.shape[0], x.shape[-1], kernel.shape[-1]
    geo = _geometry(x.shape, kernel.shape, strides, padding)
    sh, sw = strides
    th, tw = (-(-k // s) for k, s in zip(geo.kernel_hw, strides))  # taps per dimension
    bh, bw = (out - 1 + t for out, t in zip(geo.out_hw, (th, tw)))  # blocks per dimension
    # Pad (or crop) the input to exactly blocks * s rows and columns: what lies past the
    # original padding only ever meets the kernel's zero taps.
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), (
        (0, 0, 0), (padding[0][0], bh * sh - geo.in_hw[0] - padding[0][0], 0),
        (padding[1][0], bw * sw - geo.in_hw[1] - padding[1][0], 0), (0, 0, 0)))
    xs = xp.reshape(n, bh, sh, bw, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        n, bh, bw, sh * sw * c)
    kp = jnp.pad(kernel, ((0, th * sh - kernel.shape[0]), (0, tw * sw - kernel.shape[1]),
                          (0, 0), (0, 0)))
    ks = kp.reshape(th, sh, tw, sw, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(
        th, tw, sh * sw * c, o)
    return _conv_stride1(xs, ks, ((0, 0), (0, 0)))


@functools.partial(jax.jit, static_argnums=(2, 3))  # one program op by op, as _conv_fast_jit
def _conv1x1(x: Array, kernel: Array, strides: Tuple[int, int],
             float32_sums: bool = False) -> Array:
    """A 1x1 convolution as a matrix product over the channels of the strided positions
    (``float32_sums``: a bf16 product's float32 sums, unrounded)."""
    if strides != (1, 1):
        x = x[:, ::strides[0], ::strides[1]]
    n, h, w, c = x.shape
    return _matmul(x.reshape(-1, c), kernel.reshape(c, -1),
                   float32_sums and _is_bf16(x)).reshape(n, h, w, -1)


# bfloat16 products: XLA:CPU multiplies bf16 operands with its bf16 instructions (AVX-512 BF16:
# twice the float32 rate) only when asked for a float32 result; a bf16 ``a @ b`` runs at float32
# speed or below, and so does autodiff's transpose of a float32-accumulating product, whose
# cotangent operand is float32. Batch 16 on the 2-core AMD AVX-512 host (2026-12-06, medians of
# 7), (rows, in, out), bf16 ``a @ b`` -> float32-accumulated bf16 product, ms: (3136, 256, 1024)
# 8.8 -> 4.6, (12544, 512, 128) 11.9 -> 5.5.
#
# A bf16 1x1 convolution followed by batch norm hands it the product's float32 sums
# (``float32_sums``): rounded to bf16, they were converted back to float32 for BN's statistics and
# its backward, two passes over the layer's output each way that XLA:CPU runs as standalone
# conversions. bf16 train steps on the Intel AMX host (2026-12-07, A/B in both build orders, 5
# rounds, ms): resnet50 1,080 -> 1,020 and 1,108 -> 1,074, densenet121 1,234 -> 1,148 and 1,136
# -> 1,100, googlenet 550 -> 544 and 567 -> 555. BN rounds its output to bf16 as before, from the
# unrounded sums; the gradients are those of the rounded product.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a: Array, b: Array, float32_sums: bool = False) -> Array:
    """``a @ b`` in ``a``'s dtype (``float32_sums``: the float32 result, unrounded), its products
    (and its gradients') accumulated in float32. A wider ``b`` (a bf16 layer's float32 kernel) is
    rounded to ``a``'s dtype for the products, and its gradient is the float32 sums themselves."""
    y = _dot(a, b.astype(a.dtype))
    return y if float32_sums else y.astype(a.dtype)


# A bf16 classifier's kernel passes here as the float32 parameter: cast before the product (as
# ``nn.Dense`` promotes it), its weight gradient was the float32 sums rounded to bf16 and then
# converted back to float32 for the parameter, two standalone passes over the kernel's size
# (alexnet's bf16 train step: 27 `wrapped_convert`s, 45 of its 267 ms of ops, the largest fc6's
# and fc7's). The bf16 copy of the kernel is the residual; a 0-size array carries b's dtype.
def _matmul_fwd(a, b, float32_sums=False):
    b_cast = b.astype(a.dtype)
    return _matmul(a, b_cast, float32_sums), (a, b_cast, jnp.zeros((0,), b.dtype))


def _matmul_bwd(float32_sums, residuals, g):
    a, b, b_dtype = residuals
    if float32_sums:  # the float32 sums' gradient: as the rounded output's
        g = g.astype(a.dtype)
    acc = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    da = jax.lax.dot_general(g, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    if _is_bf16(a):
        db = _dot(a, g, contract_a=0)
    else:  # autodiff's own product (float32 programs as before), or kept [out, in] (below)
        db_t = jax.lax.dot_general(g, a, (((0,), (0,)), ((), ())), preferred_element_type=acc)
        if _narrow_output_first(a.shape[1], g.shape[1]):
            db_t = jax.lax.optimization_barrier(db_t)
        db = db_t.T
    return da.astype(a.dtype), db.astype(b_dtype.dtype)


# A float32 weight gradient ``a.T @ g`` contracts the rows of both operands, and XLA:CPU gives such
# products to Eigen, whose speed then depends on which operand is the left one: with the narrower
# (the output gradient of a 1x1 convolution that narrows its input) on the left, ``g.T @ a`` and
# then a transpose of the small [out, in] result, it ran 1.04-3.7x faster wherever the output had
# at most 128 channels and the input more (Intel AMX host, family 6 model 167, 2026-12-07, ms,
# medians of 9, rows x in by out: 50,176 x 256 by 64 16.2 -> 12.1, 50,176 x 192 by 128 17.0 ->
# 14.3, 12,544 x 256 by 64 3.8 -> 2.8, 3,136 x 480 by 96 2.3 -> 1.8, 3,136 x 512 by 24 2.4 -> 0.6,
# 12,544 x 512 by 128 10.0 -> 9.5; 12,544 x 256 by 128 5.0 / 5.1), but 0.6-0.9x with wider outputs
# (3,136 x 1,024 by 256 7.1 -> 7.9, 12,544 x 480 by 192 12.0 -> 13.3) or a narrower input (50,176 x
# 64 by 256 11.9 -> 16.7); the sums are the same. XLA folds a transpose of a product's result into
# the product (back to ``a.T @ g``), so the barrier holds the [out, in] result apart. Whole
# float32 train steps (batch 16, one process, both build orders, ms): googlenet 765 -> 743 and
# 769 -> 740, densenet121 1,824 -> 1,810 and 1,767 -> 1,759, resnet50 1,954 -> 1,948 and
# 1,985 -> 1,930.
_NARROW_OUTPUT_MAX = 128


def _narrow_output_first(c: int, o: int) -> bool:
    return o < c and o <= _NARROW_OUTPUT_MAX


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def add_bias(y: Array, bias: Array) -> Array:
    """``y + bias`` in the wider of their dtypes (float32 for a bf16 ``y`` and a float32 bias),
    rounded once to ``y``'s dtype. Its gradient in ``bias`` is then a float32 sum of the output
    gradient: with the bias first cast to bf16 (as ``nn.Conv`` promotes it), autodiff summed a bf16
    gradient in bf16, which XLA:CPU lowered to a tree of reduce-windows, alone 13-22x slower than
    the float32 sum and up to 11% off (vgg16's 224x224x64 conv at batch 8: 69.9 -> 4.5 ms, Intel
    AMX host, 2026-12-07). bf16 train steps, A/B in both build orders: vgg16 (batch 8) 1,972 ->
    1,726 and 2,033 -> 1,794 ms, alexnet 294 -> 263 and 297 -> 266. float32 programs are the
    same."""
    return (y + bias).astype(y.dtype)


class Conv2d(nn.Module):
    """Drop-in ``nn.Conv`` (same parameters and initializers) computed with ``conv2d``.

    ``padding`` is torch's symmetric integer padding (or Flax-style ``(lo, hi)`` pairs).
    """

    features: int
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: Any = 0
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    # For a batch norm that follows: a bf16 1x1 convolution's float32 sums, unrounded (conv2d).
    float32_sums: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = pair(self.kernel_size)
        groups = self.feature_group_count
        if x.shape[-1] % groups:
            raise ValueError(f"{x.shape[-1]} input channels do not split into {groups} groups")
        kernel = param(self, "kernel", self.kernel_init,
                       (kh, kw, x.shape[-1] // groups, self.features))
        bias = (param(self, "bias", self.bias_init, (self.features,))
                if self.use_bias else None)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding, groups, self.float32_sums)
        return y if bias is None else add_bias(y, bias)


def _bn_out(x: Array, mean: Array, var: Array, scale: Array, bias: Array, *, epsilon: float,
            dtype: Optional[Dtype]) -> Array:
    # flax.linen.BatchNorm's arithmetic, in its order and dtypes.
    y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
    return jnp.asarray(y, nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype))


_bn_eval = jax.jit(_bn_out, static_argnames=("epsilon", "dtype"))


def _batch_statistics(x: Array, *, dtype: Optional[Dtype], axis_name: Optional[str],
                      fast: bool) -> Tuple[Array, Array]:
    """Per-channel batch mean and variance (float32 at least, over ``axis_name`` too)."""
    xf = x.astype(jnp.promote_types(dtype or x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    def pmean(v):  # over axis_name's devices too (cross-device BN)
        return v if axis_name is None else jax.lax.pmean(v, axis_name)

    if fast:  # Var = E[x^2] - E[x]^2 in one pass, clipped at 0 (flax's default)
        mu, mu2 = xf.mean(axes), jax.lax.square(xf).mean(axes)
        if axis_name is not None:  # one collective for both, as flax
            mu, mu2 = jax.lax.pmean(jnp.stack([mu, mu2]), axis_name)
        return mu, jnp.maximum(0.0, mu2 - jax.lax.square(mu))
    mu = pmean(xf.mean(axes))
    return mu, pmean(jax.lax.square(xf - mu).mean(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_batch(x: Array, scale: Array, bias: Array, epsilon: float,
              dtype: Optional[Dtype]) -> Tuple[Array, Array, Array]:
    """Training BatchNorm on one device with the one-pass variance: ``(y, mean, var)``, as
    ``_batch_statistics`` and ``_bn_out`` compute them, with a hand-written backward."""
    mu, var = _batch_statistics(x, dtype=dtype, axis_name=None, fast=True)
    return _bn_out(x, mu, var, scale, bias, epsilon=epsilon, dtype=dtype), mu, var


def _bn_batch_fwd(x, scale, bias, epsilon, dtype):
    out = _bn_batch(x, scale, bias, epsilon, dtype)
    return out, (x, out[1], out[2], scale, bias)


def _bn_batch_bwd(epsilon, dtype, res, cotangents):
    # Autodiff's backward of BN materializes x - mean and dy * scale / std and reduces four times
    # (BN+ReLU's backward took 1.5-1.8x torch's at resnet50's shapes); this one is two fused
    # reductions, sum(dy) and sum(dy * x), and one elementwise pass. sum(dy * (x - mean)) taken
    # as sum(dy * x) - mean * sum(dy) cancels as the forward's E[x^2] - E[x]^2 does.
    x, mu, var, scale, bias = res
    dy, dmu, dvar = cotangents
    ct = jnp.promote_types(dtype or x.dtype, jnp.float32)
    axes = tuple(range(x.ndim - 1))
    count = math.prod(x.shape[:-1])
    xf, dyf = x.astype(ct), dy.astype(ct)
    inv = jax.lax.rsqrt(var + epsilon)
    sum_dy = dyf.sum(axes)
    sum_dy_xc = (dyf * xf).sum(axes) - mu * sum_dy  # sum(dy * (x - mean))
    a = inv * scale
    # No gradient through the clip at 0 where it binds (autodiff's lax.max passes 1/2 at an exact
    # tie: a constant channel, whose sum_dy_xc is 0).
    dvar = jnp.where(var > 0, sum_dy_xc * scale * (-0.5 * inv * inv * inv) + dvar, 0.0)
    c1 = 2 * dvar / count  # dx = a dy + (2 dvar / M) (x - mean) + (dmean - a sum(dy)) / M
    c0 = (dmu - a * sum_dy) / count - c1 * mu
    dx = a * dyf + xf * c1 + c0
    return (dx.astype(x.dtype), (sum_dy_xc * inv).astype(scale.dtype),
            sum_dy.astype(bias.dtype))


_bn_batch.defvjp(_bn_batch_fwd, _bn_batch_bwd)


def _running(ra_mean, ra_var, mu, var, momentum):
    return momentum * ra_mean + (1 - momentum) * mu, momentum * ra_var + (1 - momentum) * var


def _own_backward(axis_name: Optional[str], fast: bool) -> bool:
    """Whether BN traced now takes ``_bn_batch``'s backward: one device, one-pass variance and
    the 'batch_norm' fast formulation."""
    return axis_name is None and fast and use_fast_formulations("batch_norm")


@functools.partial(jax.jit, static_argnames=("momentum", "epsilon", "dtype", "axis_name", "fast",
                                             "own_backward"))
def _bn_train(x, ra_mean, ra_var, scale, bias, *, momentum, epsilon, dtype, axis_name, fast,
              own_backward):
    """Batch statistics, the normalized output and the updated running averages."""
    if own_backward:
        y, mu, var = _bn_batch(x, scale, bias, epsilon, dtype)
    else:
        mu, var = _batch_statistics(x, dtype=dtype, axis_name=axis_name, fast=fast)
        y = _bn_out(x, mu, var, scale, bias, epsilon=epsilon, dtype=dtype)
    return (y,) + _running(ra_mean, ra_var, mu, var, momentum)


class Normalized(NamedTuple):
    """A feature map normalized by its own batch statistics: ``(x - mean) / sqrt(var + eps)``."""

    xhat: Array
    mean: Array
    var: Array


@functools.partial(jax.jit, static_argnames=("epsilon", "dtype", "axis_name", "fast",
                                             "own_backward"))
def _normalize(x, *, epsilon, dtype, axis_name, fast, own_backward) -> Normalized:
    if own_backward:  # scale 1 and shift 0: the same values
        one = jnp.ones(x.shape[-1:], jnp.float32)
        return Normalized(*_bn_batch(x, one, jnp.zeros_like(one), epsilon, dtype))
    mu, var = _batch_statistics(x, dtype=dtype, axis_name=axis_name, fast=fast)
    xhat = (x - mu) * jax.lax.rsqrt(var + epsilon)
    return Normalized(jnp.asarray(xhat, nn.dtypes.canonicalize_dtype(x, mu, dtype=dtype)), mu, var)


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` (same fields, variables and arithmetic) whose per-channel arithmetic runs
    as one jitted function per call: op by op (un-jitted) a BN layer then compiles one program per
    shape instead of a dozen (one per mean, square, rsqrt, ...); under jit it inlines. Options
    beyond the project's (masks, other feature axes, index groups) take ``nn.BatchNorm``'s path."""

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
        if mask is not None or not self._project_options(x.ndim):
            return super().__call__(x, use_running_average, mask=mask)
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        return self._apply(x, use_running_average)

    def _project_options(self, ndim: int) -> bool:
        """The options the jitted arithmetic covers: the last axis, scale and bias, float32
        reductions, no index groups."""
        return (self.axis in (-1, ndim - 1) and self.axis_index_groups is None
                and self.use_bias and self.use_scale and self.force_float32_reductions)

    def _apply(self, x: Array, use_running_average: bool) -> Array:
        ra_mean, ra_var, scale, bias = self._variables(x.shape[-1])
        if use_running_average:
            return _bn_eval(x, ra_mean.value, ra_var.value, scale, bias, epsilon=self.epsilon,
                            dtype=self.dtype)
        initializing = self.is_initializing()
        axis_name = None if initializing else self.axis_name
        y, new_mean, new_var = _bn_train(
            x, ra_mean.value, ra_var.value, scale, bias, momentum=self.momentum,
            epsilon=self.epsilon, dtype=self.dtype, fast=self.use_fast_variance,
            axis_name=axis_name, own_backward=_own_backward(axis_name, self.use_fast_variance))
        if not initializing:  # as nn.BatchNorm: init does not update the running averages
            ra_mean.value, ra_var.value = new_mean, new_var
        return y

    def _variables(self, channels: int):
        """nn.BatchNorm's variables, in its order: running mean and variance, scale, bias."""
        features = (channels,)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = param(self, "scale", self.scale_init, features, self.param_dtype)
        bias = param(self, "bias", self.bias_init, features, self.param_dtype)
        return ra_mean, ra_var, scale, bias


class ConcatBatchNorm(BatchNorm):
    """BatchNorm of the channel concatenation of ``pieces`` (a dense layer's input), with
    BatchNorm's variables. BN is per channel, so in training the concatenation's batch statistics
    are its pieces' own: each piece is normalized once, by the first layer that reads it
    (``normalized`` holds those of earlier pieces and comes back extended), and every later
    layer only scales, shifts and concatenates them. Recomputing the statistics of the whole
    concatenation in every layer costs O(L^2) reductions over a block of L layers, forward and
    backward. Evaluation (running averages) normalizes the concatenation as BatchNorm does.
    ``normalized`` must come from ConcatBatchNorms of the same ``epsilon`` and variance mode (a
    block's layers share them). Returns ``(y, normalized)``."""

    @nn.compact
    def __call__(self, pieces: Sequence[Array], normalized: Sequence[Normalized] = (),
                 use_running_average: Optional[bool] = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        if not self._project_options(pieces[0].ndim):
            raise ValueError("ConcatBatchNorm supports BatchNorm's default options only "
                             "(last axis, scale and bias, float32 reductions)")
        normalized = tuple(normalized)
        if use_running_average:
            return self._apply(concatenate(pieces, axis=-1), True), normalized
        initializing = self.is_initializing()
        axis_name = None if initializing else self.axis_name
        own_backward = _own_backward(axis_name, self.use_fast_variance)
        normalized += tuple(_normalize(p, epsilon=self.epsilon, dtype=self.dtype,
                                       axis_name=axis_name, fast=self.use_fast_variance,
                                       own_backward=own_backward)
                            for p in pieces[len(normalized):])
        cat = lambda parts: concatenate(parts, axis=-1)  # noqa: E731
        xhat, mu, var = (cat(parts) for parts in zip(*normalized))
        ra_mean, ra_var, scale, bias = self._variables(xhat.shape[-1])
        if not initializing:  # as nn.BatchNorm: init does not update the running averages
            ra_mean.value, ra_var.value = _running(ra_mean.value, ra_var.value, mu, var,
                                                   self.momentum)
        y = xhat * scale + bias
        dtype = nn.dtypes.canonicalize_dtype(pieces[0], scale, bias, dtype=self.dtype)
        return jnp.asarray(y, dtype), normalized


def batch_norm(train: bool, dtype: Optional[Dtype] = None, name: Optional[str] = None,
               epsilon: float = 1e-5, scale_init: Callable = nn.initializers.ones,
               concat: bool = False) -> BatchNorm:
    """BatchNorm with torch's defaults (momentum 0.1 in torch = 0.9 here, eps 1e-5);
    ``concat=True``: a ``ConcatBatchNorm`` (same variables)."""
    return (ConcatBatchNorm if concat else BatchNorm)(
        use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=dtype,
        scale_init=scale_init, name=name)


class ConvBNAct(nn.Module):
    """Conv -> BatchNorm -> activation (BN and activation optional); the conv has no bias under BN."""

    features: int
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: IntOrPair = 0
    groups: int = 1
    use_norm: bool = True
    activation: Optional[str] = "relu"
    bn_epsilon: float = 1e-5
    dtype: Optional[Dtype] = None
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = Conv2d(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            feature_group_count=self.groups,
            use_bias=not self.use_norm,  # BN's shift makes a conv bias redundant
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            float32_sums=self.use_norm,
            name="conv",
        )(x)
        if self.use_norm:
            x = batch_norm(train, self.dtype, "bn", epsilon=self.bn_epsilon)(x)
        if self.activation is not None:
            x = get_activation(self.activation)(x)
        return x


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels (Krizhevsky et al. 2012, Sec. 3.3).

    ``b_c = a_c / (k + alpha * sum_{|c'-c| <= n//2} a_{c'}^2) ** beta``, the paper's formula.
    torch's ``nn.LocalResponseNorm`` divides ``alpha`` by ``n``; pass ``alpha / n`` to match it.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # Compute in float32: the sum of squares overflows bf16's precision quickly.
        xf = x.astype(jnp.float32)
        sq = jnp.square(xf)
        half = self.size // 2
        # Sum over a channel window with zero padding (a 1D box filter along C).
        summed = jax.lax.reduce_window(
            sq, 0.0, jax.lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
            ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
        return (xf / jnp.power(self.k + self.alpha * summed, self.beta)).astype(x.dtype)


def dense(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` over ``x``'s last axis, in ``x``'s dtype (a wider ``kernel``, a bf16 layer's
    float32 parameter, is rounded to it). On the CPU's fast path (``"conv1x1"``: a dense layer
    is a 1x1 convolution of a 1x1 map) it is ``_matmul``, so that bf16 classifiers multiply bf16
    operands into float32 in all three products: as a bf16 ``x @ kernel`` they ran at float32
    speed or below, and XLA transposed their weight gradients in separate passes (alexnet's bf16
    train step: fc6's and fc7's gradient transposes and conversions 230 ms of 813); a float32
    kernel gets the float32 sums as its gradient. float32 programs are those of ``x @ kernel``,
    but for a few rows by a large kernel (``_use_few_rows``: the forward product on Eigen instead
    of YNNPACK, the input gradient as ``(kernel @ g.T).T``)."""
    if not use_fast_formulations("conv1x1"):
        return x @ kernel.astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    y = _few_rows_matmul(rows, kernel) if _use_few_rows(rows, kernel) else _matmul(rows, kernel)
    return y.reshape(x.shape[:-1] + kernel.shape[-1:])


# A float32 classifier's forward product at a small batch (AlexNet's and VGG's fc6 and fc7) reads
# a kernel of 16-100M entries to multiply a few rows. XLA:CPU hands ``x @ kernel`` to YNNPACK,
# which reads such kernels at about 6.5 GB/s here; XLA's Eigen product of the same operands runs
# 1.3-2x faster (Intel AMX host, 2026-12-07, ms, YNNPACK -> Eigen, medians of 11: 16 x 9,216 by
# 4,096 23.6 -> 16.8, 16 x 4,096 by 4,096 8.3 -> 5.8, 8 x 25,088 by 4,096 48.7 -> 35.5, and
# 64 x 9,216 by 4,096 29.9 -> 23.6), while at 4M entries or fewer YNNPACK is as fast or faster
# (16 x 4,096 by 1,000: 1.1 against 1.8). YNNPACK declines a product whose left operand is
# column-major (xla/backends/cpu/ynn_support.cc), so the forward contracts a transposed copy of
# the rows (a few MB), held apart by an optimization barrier: else XLA folds the transpose back
# into the product's dimensions. The weight gradient is autodiff's (Eigen's either way), the input
# gradient a plain product on YNNPACK (see the backward). bf16 keeps ``_matmul``: YNNPACK's bf16
# products are the faster ones (16 x 9,216 by 4,096: 10.6 against 25.0 ms).
_FEW_ROWS_MAX = 64
_FEW_ROWS_MIN_KERNEL = 1 << 24


def _use_few_rows(rows: Array, kernel: Array) -> bool:
    # A symbolic batch (``jax.export`` for any batch size) takes the plain product.
    return (rows.dtype == jnp.float32 and kernel.dtype == jnp.float32
            and kernel.size >= _FEW_ROWS_MIN_KERNEL and isinstance(rows.shape[0], int)
            and rows.shape[0] <= _FEW_ROWS_MAX)


@jax.custom_vjp
def _few_rows_matmul(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` (float32) as Eigen's product of ``x``'s transposed copy."""
    return jax.lax.dot_general(jax.lax.optimization_barrier(x.T), kernel,
                               (((0,), (0,)), ((), ())))


def _few_rows_matmul_fwd(x, kernel):
    return _few_rows_matmul(x, kernel), (x, kernel)


def _few_rows_matmul_bwd(residuals, g):
    x, kernel = residuals
    # The input gradient as (kernel @ g.T).T: YNNPACK's plain product of the kernel by a
    # transposed copy of the few rows' gradient runs 1.2-2.5x faster than its ``g @ kernel.T``
    # (medians of 11, ms: 16 x 4,096 into 9,216 15.8 -> 7.5, 8 x 4,096 into 25,088 44.7 -> 17.9,
    # 16 x 4,096 into 4,096 4.1 -> 2.5, 64 x 4,096 into 9,216 21.6 -> 18.6). Both barriers are
    # needed: without the second XLA folds the result's transpose into the product, which then
    # runs on Eigen at 94 ms. float32 train steps (A/B, both build orders, ms): alexnet (batch
    # 16) 327 -> 311 and 328 -> 313, vgg16 (batch 8) 2,599 -> 2,595 and 2,592 -> 2,541.
    g_t = jax.lax.optimization_barrier(g.T)
    dx = jax.lax.optimization_barrier(
        jax.lax.dot_general(kernel, g_t, (((1,), (0,)), ((), ())))).T
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))
    return dx, dw


_few_rows_matmul.defvjp(_few_rows_matmul_fwd, _few_rows_matmul_bwd)


class Dense(nn.Dense):
    """``nn.Dense`` (same fields, parameters and initializers) whose product is ``dense``, given
    the float32 kernel of a bf16 layer (its gradient: float32 sums, see ``_matmul``), and whose
    bias is added by ``add_bias`` (float32, rounded once)."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        if self.precision is not None or self.dot_general is not None or \
                self.dot_general_cls is not None or self.promote_dtype is not nn.dtypes.promote_dtype:
            raise ValueError("layers.Dense computes x @ kernel with layers.dense; for a precision, "
                             "dot_general or promote_dtype of your own use flax.linen.Dense")
        kernel = param(self, "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                       self.param_dtype)
        bias = (param(self, "bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        # nn.Dense's dtype rule (flax.linen.dtypes.promote_dtype): all three's when not given.
        dtype = self.dtype or jnp.result_type(inputs, kernel, *([] if bias is None else [bias]))
        y = dense(jnp.asarray(inputs, dtype), kernel)
        return y if bias is None else add_bias(y, bias)


class DenseAsConv(nn.Module):
    """A fully connected layer that can also run as a convolution with the same weights.

    The kernel is stored as ``[in_features, out]`` with ``in_features = kh * kw * C`` in NHWC
    flatten order, so ``as_conv=True`` reshapes it to a ``[kh, kw, C, out]`` conv kernel: the
    fully-convolutional evaluation of Simonyan & Zisserman (2015), Sec. 3.2.
    """

    features: int
    window: Tuple[int, int] = (1, 1)  # spatial extent of the input this layer sees as a conv
    dtype: Optional[Dtype] = None
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array, as_conv: bool = False) -> Array:
        # As a dense layer x is already flattened; as a conv each output sees a kh x kw window.
        in_features = x.shape[-1] * (self.window[0] * self.window[1] if as_conv else 1)
        kernel = param(self, "kernel", self.kernel_init, (in_features, self.features))
        bias = param(self, "bias", nn.initializers.zeros, (self.features,))
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if not as_conv:  # the float32 kernel: dense rounds it (its gradient stays float32)
            return add_bias(dense(x, kernel), bias)
        conv_kernel = kernel.astype(dtype).reshape(self.window + (x.shape[-1], self.features))
        y = jax.lax.conv_general_dilated(x, conv_kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return add_bias(y, bias)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree (e.g. ``variables['params']``)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def split_logits(outputs: Any) -> Tuple[Array, Tuple[Array, ...]]:
    """Split a model's output into ``(logits, aux_logits)``.

    Every model returns logits, except GoogLeNet in train mode with auxiliary heads, which returns
    a tuple whose first entry is the main logits (torchvision's ``GoogLeNetOutputs`` order).
    """
    if isinstance(outputs, tuple):
        return outputs[0], tuple(o for o in outputs[1:] if o is not None)
    return outputs, ()
