"""The shared layers against brute-force NumPy references of torch's semantics."""

import functools
import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.models import layers

from _variables import normal


def _torch_pool_out(n, k, s, p, ceil_mode):
    """torch's output-size rule for MaxPool2d/AvgPool2d (docs of torch.nn.MaxPool2d)."""
    num = n + 2 * p - k
    out = (math.ceil(num / s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _ref_max_pool(x, k, s, p, ceil_mode):
    n, h, w, c = x.shape
    oh, ow = _torch_pool_out(h, k, s, p, ceil_mode), _torch_pool_out(w, k, s, p, ceil_mode)
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - p, j * s - p
            win = x[:, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w)]
            out[:, i, j] = win.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [7, 8, 13, 14, 112, 113])
@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (3, 2, 1), (2, 2, 0), (3, 1, 1)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch_semantics(size, k, s, p, ceil_mode):
    x = np.random.default_rng(0).normal(size=(1, size, size + 1, 2)).astype(np.float32)
    got = layers.max_pool(jnp.asarray(x), k, s, p, ceil_mode=ceil_mode)
    np.testing.assert_allclose(got, _ref_max_pool(x, k, s, p, ceil_mode))


def test_eager_fast_max_pool_compiles_one_program():
    """Op by op (a notebook, the un-jitted model checks) the fast max pool runs as one compiled
    program per geometry, not one per pad, window slice and maximum (11 for this 3x3 pool)."""
    compiles = []

    def listener(name, secs, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    x = normal(3, (1, 11, 12, 3))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with layers.implementation("fast"):
            got = layers.max_pool(x, 3, 2, 1, ceil_mode=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) <= 1, len(compiles)  # 0 where the persistent cache had it
    np.testing.assert_array_equal(got, _ref_max_pool(np.asarray(x), 3, 2, 1, True))


def test_avg_pool_counts_padding_like_torch():
    x = jnp.ones((1, 4, 4, 1))
    y = layers.avg_pool(x, 3, 2, 1)
    # The corner window covers 4 real pixels of 9 (count_include_pad=True): 4/9.
    np.testing.assert_allclose(y[0, 0, 0, 0], 4 / 9, rtol=1e-6)


@pytest.mark.parametrize("in_hw,out", [((13, 13), 6), ((5, 7), 6), ((14, 14), 7), ((1, 1), 7),
                                       ((10, 9), (4, 3))])
def test_adaptive_avg_pool_matches_torch_bins(in_hw, out):
    x = np.random.default_rng(1).normal(size=(2, *in_hw, 3)).astype(np.float32)
    oh, ow = layers.pair(out)
    ref = np.empty((2, oh, ow, 3), np.float32)
    for i in range(oh):
        for j in range(ow):
            r = slice(math.floor(i * in_hw[0] / oh), math.ceil((i + 1) * in_hw[0] / oh))
            c = slice(math.floor(j * in_hw[1] / ow), math.ceil((j + 1) * in_hw[1] / ow))
            ref[:, i, j] = x[:, r, c].mean(axis=(1, 2))
    np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), out), ref, rtol=1e-5,
                               atol=1e-6)


def test_lrn_matches_paper_formula():
    x = np.random.default_rng(2).normal(size=(2, 3, 3, 11)).astype(np.float32) * 10
    n, alpha, beta, k = 5, 1e-4, 0.75, 2.0
    ref = np.empty_like(x)
    for c in range(11):
        lo, hi = max(0, c - n // 2), min(11, c + n // 2 + 1)
        ref[..., c] = x[..., c] / (k + alpha * (x[..., lo:hi] ** 2).sum(-1)) ** beta
    got = layers.LocalResponseNorm(n, alpha, beta, k).apply({}, jnp.asarray(x))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_conv_uses_symmetric_padding_for_stride_2():
    # torch pads 1 on every side for a 3x3/2 conv; Flax's 'SAME' would pad (0, 1) on an even input.
    conv = layers.Conv2d(1, 3, strides=2, padding=1, use_bias=False)
    x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
    v = {"params": {"kernel": jnp.ones((3, 3, 1, 1))}}
    y = conv.apply(v, x)
    chex.assert_shape(y, (1, 2, 2, 1))
    assert y[0, 0, 0, 0] == 1.0  # the top-left pixel is inside the first (padded) window


def test_grouped_conv_param_count():
    x = jnp.zeros((1, 8, 8, 4))
    full = layers.Conv2d(8, 3, padding=1).init(jax.random.key(0), x)
    grouped = layers.Conv2d(8, 3, padding=1, feature_group_count=2).init(jax.random.key(0), x)
    assert layers.count_params(grouped) == 3 * 3 * 2 * 8 + 8
    assert layers.count_params(full) == 3 * 3 * 4 * 8 + 8


def test_dense_as_conv_same_weights_same_result():
    layer = layers.DenseAsConv(6, window=(3, 3))
    feats = normal(0, (2, 3, 3, 4))
    v = layer.init(jax.random.key(1), layers.flatten(feats))
    dense = layer.apply(v, layers.flatten(feats))
    conv = layer.apply(v, feats, as_conv=True)
    chex.assert_shape(conv, (2, 1, 1, 6))
    np.testing.assert_allclose(dense, conv[:, 0, 0], rtol=1e-5, atol=1e-5)
    # On a larger map the conv slides the same classifier over every window.
    big = layer.apply(v, normal(2, (2, 5, 6, 4)), as_conv=True)
    chex.assert_shape(big, (2, 3, 4, 6))


@pytest.mark.parametrize("layer,x_shape", [
    (layers.Conv2d(8, 3, padding=1, dtype=jnp.bfloat16), (4, 32, 32, 3)),
    (layers.DenseAsConv(8, dtype=jnp.bfloat16), (4, 256)),
], ids=["Conv2d", "DenseAsConv"])
def test_bf16_bias_is_added_and_summed_in_float32(layer, x_shape):
    """A bf16 layer's float32 bias is added in float32 and rounded once, and its gradient is the
    float32 sum of the output gradient. (With the bias cast to bf16 first, autodiff summed the
    gradient in bf16: this test's conv bias gradient, over 4,096 rows, was off by up to 5.8.)"""
    x = normal(0, x_shape).astype(jnp.bfloat16)
    v = layer.init(jax.random.key(1), x)
    v = jax.tree_util.tree_map(lambda a: a + 0.1 if a.ndim == 1 else a, v)  # nonzero bias
    y, vjp = jax.vjp(lambda p: layer.apply({"params": p}, x), v["params"])
    assert y.dtype == jnp.bfloat16
    without = layer.apply({"params": {**v["params"], "bias": 0 * v["params"]["bias"]}}, x)
    np.testing.assert_array_equal(  # one rounding of the float32 sum
        y, (without.astype(jnp.float32) + v["params"]["bias"]).astype(jnp.bfloat16))
    g = normal(2, y.shape).astype(jnp.bfloat16)
    db = vjp(g)[0]["bias"]
    assert db.dtype == jnp.float32
    want = np.asarray(g, np.float64).reshape(-1, y.shape[-1]).sum(0)
    np.testing.assert_allclose(db, want, rtol=1e-5, atol=1e-4)


def test_bf16_1x1_conv_hands_batch_norm_its_float32_sums():
    """ConvBNAct in bf16: on the CPU's fast path the 1x1 conv's float32 sums reach BN unrounded
    (BN rounds its output once); the conv's gradients are those of the rounded product (the same
    bf16 products), and under XLA's own ops (GPUs) the conv rounds as before."""
    m = layers.ConvBNAct(16, 1, dtype=jnp.bfloat16)
    x = normal(0, (4, 6, 6, 24)).astype(jnp.bfloat16)
    v = m.init(jax.random.key(1), x)
    kernel = v["params"]["conv"]["kernel"].astype(jnp.bfloat16)
    sums = jnp.einsum("nhwc,co->nhwo", x.astype(jnp.float32), kernel[0, 0].astype(jnp.float32))
    conv = layers.Conv2d(16, 1, use_bias=False, dtype=jnp.bfloat16, float32_sums=True)
    y = conv.apply({"params": v["params"]["conv"]}, x)
    assert y.dtype == jnp.float32  # the sums, unrounded
    np.testing.assert_allclose(y, sums, rtol=1e-6, atol=1e-6)
    with layers.implementation("xla"):
        assert conv.apply({"params": v["params"]["conv"]}, x).dtype == jnp.bfloat16
    out, _ = m.apply(v, x, train=True, mutable=["batch_stats"])
    bn = layers.batch_norm(True, jnp.bfloat16)
    want, _ = bn.apply({"params": v["params"]["bn"], "batch_stats": v["batch_stats"]["bn"]},
                       sums, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, jnp.maximum(want, 0))

    def grads(float32_sums):
        c = layers.Conv2d(16, 1, use_bias=False, dtype=jnp.bfloat16, float32_sums=float32_sums)
        f = lambda p, x: jnp.sum(jnp.sin(c.apply({"params": p}, x).astype(jnp.bfloat16)  # noqa: E731
                                         .astype(jnp.float32)))
        return jax.grad(f, argnums=(0, 1))(v["params"]["conv"], x)

    chex.assert_trees_all_equal(grads(True), grads(False))


def test_conv_bn_act_train_updates_stats_and_bf16():
    m = layers.ConvBNAct(4, 3, padding=1, dtype=jnp.bfloat16)
    x = normal(0, (2, 5, 5, 3))
    v = m.init(jax.random.key(1), x)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(v))
    assert "bias" not in v["params"]["conv"]  # BN's shift makes a conv bias redundant
    y, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert not np.allclose(upd["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])


def _bn_pair(train, dtype):
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    return flax_bn, layers.batch_norm(train, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_norm_equals_flax_batch_norm(train, dtype):
    """layers.BatchNorm is nn.BatchNorm with its arithmetic jitted: same variables (names, order,
    init values), outputs, dtypes, running averages and gradients, jitted or not."""
    flax_bn, ours = _bn_pair(train, dtype)
    assert isinstance(ours, nn.BatchNorm)  # what train_step.batch_norm_axis intercepts
    x = (normal(0, (4, 5, 5, 7)) * 3 + 1).astype(dtype)
    v = flax_bn.init(jax.random.key(1), x)
    mine = ours.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(mine, v)
    assert [list(c) for c in mine.values()] == [list(c) for c in v.values()]
    v = jax.tree_util.tree_map(lambda a: a + 0.3 * normal(2, a.shape), v)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    (want, want_stats) = flax_bn.apply(v, x, mutable=["batch_stats"])
    apply = functools.partial(ours.apply, mutable=["batch_stats"])
    for run in (apply, jax.jit(apply)):
        got, stats = run(v, x)
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
        chex.assert_trees_all_close(stats, want_stats, rtol=1e-6, atol=1e-7)
    if dtype == jnp.float32:
        def grads(m):
            return jax.grad(lambda p, x: jnp.sum(m.apply({**v, "params": p}, x, mutable=[
                "batch_stats"])[0] ** 2), argnums=(0, 1))(v["params"], x)
        chex.assert_trees_all_close(grads(ours), grads(flax_bn), rtol=1e-5, atol=1e-5)


def test_batch_norm_over_a_named_axis_and_with_a_mask():
    """Statistics over vmap's named axis (cross-device BN) equal those of the whole batch; the
    two-pass variance equals nn.BatchNorm's; a mask (an option the project does not use) takes
    nn.BatchNorm's own path."""
    from cnn_jax import train_step as ts

    flax_bn, ours = _bn_pair(True, None)
    x = normal(0, (16, 4, 4, 3)) * 2 + 0.5
    v = ours.init(jax.random.key(1), x)

    def apply(x, axis):
        with ts.batch_norm_axis(axis):
            return ours.apply(v, x, mutable=["batch_stats"])

    full, full_stats = apply(x, None)
    split, split_stats = jax.vmap(lambda xs: apply(xs, "d"), axis_name="d")(x.reshape(4, 4, 4, 4, 3))
    np.testing.assert_allclose(split.reshape(x.shape), full, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[0], split_stats), full_stats,
                                rtol=1e-5, atol=1e-7)
    local, _ = jax.vmap(lambda xs: apply(xs, None))(x.reshape(4, 4, 4, 4, 3))
    assert not np.allclose(local.reshape(x.shape), full, atol=1e-3)  # per-device BN differs
    two_pass = dict(use_running_average=False, momentum=0.9, use_fast_variance=False)
    got = layers.BatchNorm(**two_pass).apply(v, x, mutable=["batch_stats"])
    chex.assert_trees_all_close(got, nn.BatchNorm(**two_pass).apply(v, x, mutable=["batch_stats"]),
                                rtol=1e-6, atol=1e-6)  # Var = E[(x - E[x])^2]
    mask = jnp.arange(16)[:, None, None, None] < 10
    np.testing.assert_allclose(ours.apply(v, x, mask=mask, mutable=["batch_stats"])[0],
                               flax_bn.apply(v, x, mask=mask, mutable=["batch_stats"])[0],
                               rtol=1e-6, atol=1e-6)


def _pieces(widths, batch=6, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(widths))
    return [jax.random.normal(k, (batch, 3, 3, c)) * (1 + i) + i for i, (k, c) in
            enumerate(zip(keys, widths))]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_concat_batch_norm_equals_batch_norm_of_the_concatenation(train):
    """ConcatBatchNorm (DenseNet's layer inputs) has BatchNorm's variables, and its outputs,
    running averages and gradients (in the pieces and the parameters) are those of BatchNorm
    applied to the concatenation, whether it normalizes every piece itself or reuses those an
    earlier layer normalized."""
    pieces = _pieces((5, 2, 2, 2))
    cat = jnp.concatenate(pieces, axis=-1)
    plain, ours = layers.batch_norm(train), layers.batch_norm(train, concat=True)
    assert isinstance(ours, nn.BatchNorm)  # what train_step.batch_norm_axis intercepts
    v = plain.init(jax.random.key(1), cat)
    chex.assert_trees_all_equal(ours.init(jax.random.key(1), pieces), v)  # names, values
    v = jax.tree_util.tree_map(lambda a: a + 0.3 * normal(2, a.shape), v)
    want, want_stats = plain.apply(v, cat, mutable=["batch_stats"])
    # An earlier layer (its own BN) read the first two pieces: its normalized pieces are reused.
    first = layers.batch_norm(train, concat=True)
    v_first = first.init(jax.random.key(4), pieces[:2])
    _, earlier = jax.jit(lambda: first.apply(v_first, pieces[:2], mutable=["batch_stats"])[0])()
    assert len(earlier) == (2 if train else 0)  # evaluation normalizes by the running averages
    for normalized in ((), earlier):
        (got, normalized_all), stats = jax.jit(
            lambda p, n: ours.apply(v, p, n, mutable=["batch_stats"]))(pieces, normalized)
        assert len(normalized_all) == (4 if train else 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(stats, want_stats, rtol=1e-6, atol=1e-6)
    if train:
        for xhat, piece in zip(normalized_all, pieces):  # each piece's own batch statistics
            np.testing.assert_allclose(xhat.mean, piece.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(xhat.var, piece.var((0, 1, 2)), rtol=1e-5, atol=1e-6)

    w = normal(3, want.shape)  # a loss that weighs every output
    def loss_plain(params, pieces):
        y = plain.apply({**v, "params": params}, jnp.concatenate(pieces, axis=-1),
                        mutable=["batch_stats"])[0]
        return jnp.sum(jnp.sin(y) * w)

    def loss_ours(params, pieces):
        # As in a dense block: the first two pieces are normalized by an earlier layer.
        (_, earlier), _ = first.apply(v_first, pieces[:2], mutable=["batch_stats"])
        y = ours.apply({**v, "params": params}, pieces, earlier, mutable=["batch_stats"])[0][0]
        return jnp.sum(jnp.sin(y) * w)

    grads = [jax.jit(jax.grad(f, argnums=(0, 1)))(v["params"], pieces)
             for f in (loss_plain, loss_ours)]
    chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_concat_batch_norm_over_a_named_axis():
    """Each piece's statistics span vmap's named axis (cross-device BN), as BatchNorm's do."""
    from cnn_jax import train_step as ts

    pieces = _pieces((3, 2), batch=16)
    bn = layers.batch_norm(True, concat=True)
    v = bn.init(jax.random.key(1), pieces)

    def apply(ps, axis):
        with ts.batch_norm_axis(axis):
            return bn.apply(v, ps, mutable=["batch_stats"])

    (full, _), full_stats = apply(pieces, None)
    (split, _), split_stats = jax.vmap(lambda ps: apply(ps, "d"), axis_name="d")(
        [p.reshape(4, 4, 3, 3, -1) for p in pieces])
    np.testing.assert_allclose(split.reshape(full.shape), full, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[0], split_stats), full_stats,
                                rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="default options"):
        layers.ConcatBatchNorm(use_running_average=False, use_scale=False).init(
            jax.random.key(0), pieces)


def test_split_logits():
    a = jnp.zeros((2, 3))
    main, aux = layers.split_logits(a)
    assert main is a and aux == ()
    main, aux = layers.split_logits((a, a + 1, None))
    assert main is a and len(aux) == 1


def test_unknown_activation():
    with pytest.raises(ValueError, match="choose one of"):
        layers.get_activation("swishy")


def test_apply_checks_parameter_shapes_without_tracing_the_initializer():
    """layers.param: apply still rejects a parameter of the wrong shape (Flax's check), and does
    not trace the layer's initializer to do it (init still draws from it)."""
    calls = []

    def counting_init(key, shape, dtype=jnp.float32):
        calls.append(shape)
        return nn.initializers.lecun_normal()(key, shape, dtype)

    conv = layers.Conv2d(4, 3, padding=1, kernel_init=counting_init)
    x = jnp.ones((1, 8, 8, 2))
    variables = conv.init(jax.random.key(0), x)
    assert calls == [(3, 3, 2, 4)] and float(jnp.abs(variables["params"]["kernel"]).sum()) > 0
    conv.apply(variables, x)
    assert calls == [(3, 3, 2, 4)]  # apply: no second call
    wrong = {"params": {**variables["params"], "kernel": jnp.zeros((3, 3, 2, 5))}}
    with pytest.raises(flax.errors.ScopeParamShapeError, match="kernel"):
        conv.apply(wrong, x)
