"""EMA of the weights, gradient accumulation, float16 loss scaling and mixup in the train step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _train_helpers as h
from cnn_jax import optim, parallel, train_lib
from cnn_jax import train_step as ts


class NoBN(nn.Module):
    """conv -> relu -> mean -> dense: no batch norm, so micro-batches are independent."""

    num_classes: int = 10
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), dtype=self.dtype)(x)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def _state(model, tx, dtype=jnp.float32):
    return ts.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3), dtype)


def test_k_micro_batches_equal_one_k_times_larger_step():
    def make_tx():  # Adam: the update is non-linear in the gradient, so only its mean will do
        return optax.adamw(1e-2, weight_decay=1e-2)

    k, micro = 4, 4
    big = h.fake_batches(2, k * micro)  # two updates
    step = jax.jit(ts.train_step)
    one = _state(NoBN(), make_tx())
    acc = _state(NoBN(), optim.accumulate(make_tx(), k))
    for batch in big:
        one, _ = step(one, batch)
        for i in range(k):
            before = acc.params
            acc, _ = step(acc, {n: v[i * micro:(i + 1) * micro] for n, v in batch.items()})
            if i < k - 1:  # the parameters move only on the k-th micro-batch
                jax.tree_util.tree_map(np.testing.assert_array_equal, acc.params, before)
    assert int(acc.step) == 2 * k and int(acc.opt_state.gradient_step) == 2
    # Float32 sums in another order; Adam divides by sqrt(nu), which magnifies that where the
    # gradient is near 0.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                           acc.params, one.params)


def test_ema_of_weights_and_bn_statistics():
    decay = 0.5
    state = ts.init_ema(_state(h.tiny_module(), optax.sgd(0.1)))
    step = jax.jit(functools.partial(ts.train_step, ema_decay=decay, ema_warmup=False))
    ema_p, ema_bs = state.ema_params, state.ema_batch_stats
    for batch in h.fake_batches(3, 8):
        state, _ = step(state, batch)
        ema_p = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema_p,
                                       state.params)
        ema_bs = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema_bs,
                                        state.batch_stats)
    for got, want in ((state.ema_params, ema_p), (state.ema_batch_stats, ema_bs)):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    assert not np.allclose(state.ema_batch_stats["bn"]["mean"], state.batch_stats["bn"]["mean"])

    batch = dict(h.fake_batches(1, 8, seed=9)[0], mask=np.ones(8, bool))
    raw = ts.eval_step(state, batch)
    ema = ts.eval_step(state, batch, use_ema=True)
    swapped = state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)
    np.testing.assert_allclose(ema["loss"], ts.eval_step(swapped, batch)["loss"], rtol=1e-6)
    assert float(raw["loss"]) != float(ema["loss"])
    # TF's warmup: decay min(d, (1 + n) / (10 + n)).
    np.testing.assert_allclose(ts.ema_decay_at(0.999, jnp.int32(0), True), 0.1)
    np.testing.assert_allclose(ts.ema_decay_at(0.999, jnp.int32(10 ** 6), True), 0.999)


def test_ema_updates_once_per_accumulated_step():
    k = 2
    state = ts.init_ema(_state(NoBN(), optim.accumulate(optax.sgd(0.1), k)))
    step = jax.jit(functools.partial(ts.train_step, ema_decay=0.5, ema_warmup=False))
    first = state.ema_params
    state, _ = step(state, h.fake_batches(1, 4)[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.ema_params, first)
    state, _ = step(state, h.fake_batches(1, 4, seed=1)[0])
    jax.tree_util.tree_map(lambda e, f, p: np.testing.assert_allclose(e, 0.5 * f + 0.5 * p,
                                                                       rtol=1e-6),
                           state.ema_params, first, state.params)


def test_float16_overflow_is_skipped_not_divergence():
    model = h.tiny_module().clone(dtype=jnp.float16)
    state = _state(model, optax.sgd(0.1), jnp.float16).replace(
        dynamic_scale=ts.new_dynamic_scale())
    step = jax.jit(ts.train_step)
    good = h.fake_batches(1, 8)[0]
    huge = dict(good, image=np.clip(good["image"] * 6e4, -6e4, 6e4).astype(np.float16))
    skipped, metrics = step(state, huge)
    assert float(metrics["skipped"]) == 1.0 and int(skipped.step) == 1
    assert float(skipped.dynamic_scale.scale) == float(state.dynamic_scale.scale) / 2
    for field in ("params", "opt_state", "batch_stats"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(skipped, field),
                               getattr(state, field))
    updated, metrics = step(skipped, dict(good, image=good["image"].astype(np.float16)))
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert jax.tree_util.tree_leaves(updated.params)[0].dtype == jnp.float32
    assert not np.allclose(jax.tree_util.tree_leaves(updated.params)[0],
                           jax.tree_util.tree_leaves(state.params)[0])

    dp = parallel.DataParallel("pmap")
    assert dp.single  # one device: the step's metrics are scalars, without a device axis
    bad = {"loss": np.array(np.inf), "grad_norm": np.array(np.inf),
           "skipped": np.array(1.0), "loss_scale": np.array(1024.0)}
    train_lib._check_finite(dp, [bad], 1)  # skipped by the scaler: no error
    with pytest.raises(train_lib.NonFiniteLossError, match="diverged at step 3"):
        train_lib._check_finite(dp, [dict(bad, loss_scale=np.array(1.0))], 3)
    means = train_lib._mean_metrics(dp, [
        {"loss": np.array(np.inf), "skipped": np.array(1.0), "loss_scale": np.array(2.0)},
        {"loss": np.array(2.0), "skipped": np.array(0.0), "loss_scale": np.array(1.0)}])
    assert means == {"loss": 2.0, "skipped_steps": 1.0, "loss_scale": 1.0}


def test_mixup_cutmix_in_the_step_are_deterministic():
    state = _state(h.tiny_module(), optax.sgd(0.1))
    batch = h.fake_batches(1, 8)[0]
    mixed = jax.jit(functools.partial(ts.train_step, mixup_alpha=0.2, cutmix_alpha=1.0))
    a, b = mixed(state, batch)[1], mixed(state, batch)[1]
    plain = jax.jit(ts.train_step)(state, batch)[1]
    assert float(a["loss"]) == float(b["loss"]) != float(plain["loss"])
    # Soft targets: lam * y + (1 - lam) * y' equals the mixed losses.
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 10).astype(np.float32))
    y, y2 = jnp.array([0, 1, 2, 3]), jnp.array([3, 0, 1, 2])
    np.testing.assert_allclose(
        ts.cross_entropy(logits, y, 0.0, y2, 0.3),
        0.3 * ts.cross_entropy(logits, y) + 0.7 * ts.cross_entropy(logits, y2), rtol=1e-5)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        optim.accumulate(optax.sgd(0.1), 0)
    with pytest.raises(ValueError, match="START:END"):
        train_lib.parse_profile_steps("5")
    assert train_lib.parse_profile_steps("2:4") == (2, 4)
    assert train_lib.parse_profile_steps("") is None
    # A window opening at the run's first step (0, or the step it resumes from) traces the compile.
    assert "--config.profile_steps=1:4" in train_lib.profile_compile_note((0, 3), 0)
    assert "--config.profile_steps=8:10" in train_lib.profile_compile_note((7, 9), 7)
    assert "nothing is traced" in train_lib.profile_compile_note((2, 4), 3)
    assert train_lib.profile_compile_note((2, 4), 0) is None
    assert train_lib.profile_compile_note(None, 0) is None
