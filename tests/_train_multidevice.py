"""Multi-device checks on 8 fake CPU devices, run as a subprocess by tests/test_parallel.py.

XLA's device count is fixed when JAX starts, and the rest of the suite runs on one device in the
pytest process, so these live in their own program (an absltest/chex suite).
"""

import functools

import chex

chex.set_n_cpu_devices(8)  # before anything initializes JAX's backends

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl.testing import absltest, parameterized  # noqa: E402

import _train_helpers as h  # noqa: E402
from cnn_jax import parallel  # noqa: E402
from cnn_jax import train_step as ts  # noqa: E402

N = 8
GLOBAL_BATCH = 32
STEPS = 3


def _init(dropout=0.0):
    model = h.tiny_module(dropout=dropout)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    return ts.create_train_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3))


@functools.lru_cache(maxsize=None)
def _run_parallel(mode, cross_bn, dropout=0.0):
    """(losses, per-device batch stats before syncing, synced state on device 0) of 3 steps."""
    state, batches = _init(dropout), h.fake_batches(STEPS, GLOBAL_BATCH)
    dp = parallel.DataParallel(mode)
    step = dp.map(functools.partial(ts.train_step, axis_name="batch",
                                    bn_axis_name="batch" if cross_bn else None),
                  donate_argnums=(0,))
    sync = dp.map(functools.partial(ts.sync_batch_stats, axis_name="batch"), donate_argnums=(0,))
    rstate = dp.replicate(jax.tree_util.tree_map(np.asarray, state))
    losses = []
    for b in batches:
        rstate, m = step(rstate, dp.shard(h.split_devices(b, N)))
        losses.append(float(dp.unreplicate(m)["loss"]))
    per_device_stats = jax.device_get(rstate.batch_stats)
    return losses, per_device_stats, dp.unreplicate(sync(rstate))


@functools.lru_cache(maxsize=None)
def _run_single():
    state, batches = _init(), h.fake_batches(STEPS, GLOBAL_BATCH)
    step = jax.jit(ts.train_step, donate_argnums=(0,))
    state = jax.tree_util.tree_map(jnp.array, state)
    losses = []
    for b in batches:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state)


class StepVariantsTest(chex.TestCase):
    """The same per-device step under jit (1 device) and pmap (8 devices) via chex variants."""

    @chex.variants(with_jit=True, with_pmap=True)
    def test_step_variants(self):
        state = _init()
        batch = h.fake_batches(1, GLOBAL_BATCH)[0]
        pmapped = self.variant.type == chex.ChexVariantType.WITH_PMAP
        axis = "i" if pmapped else None  # chex's pmap variant names its axis 'i'
        step = self.variant(functools.partial(ts.train_step, axis_name=axis, bn_axis_name=axis),
                            broadcast_args_to_devices=False, n_devices=N)
        if pmapped:  # one copy of the state per device, each device its own rows of the batch
            new_state, metrics = step(
                jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (N,) + np.shape(x)), state),
                h.split_devices(batch, N))
        else:
            new_state, metrics = step(state, batch)
        # Cross-device BN over 8 devices equals BN over the whole batch on one device.
        ref_state, ref_metrics = jax.jit(ts.train_step)(state, batch)
        chex.assert_trees_all_close(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        chex.assert_trees_all_close(new_state.params, ref_state.params, rtol=1e-4, atol=1e-6)
        self.assertEqual(int(new_state.step), 1)


class DataParallelTest(parameterized.TestCase):

    def test_devices(self):
        self.assertEqual(jax.device_count(), N)

    def test_pmap_8_devices_equals_1_device(self):
        """Global-batch BN + pmean'd gradients on 8 devices == one device on the whole batch."""
        single, s1 = _run_single()
        multi, _, synced = _run_parallel("pmap", True)
        np.testing.assert_allclose(multi, single, rtol=1e-5)
        chex.assert_trees_all_close(synced.params, s1.params, rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(synced.batch_stats, s1.batch_stats, rtol=1e-4, atol=1e-6)

    @parameterized.parameters((False, 0.3), (True, 0.0))
    def test_shard_map_equals_pmap(self, cross_bn, dropout):
        """Same losses and state; with dropout this also checks the per-device dropout keys."""
        lp, _, sp = _run_parallel("pmap", cross_bn, dropout)
        ls, _, ss = _run_parallel("shard_map", cross_bn, dropout)
        np.testing.assert_allclose(ls, lp, rtol=1e-6)
        chex.assert_trees_all_close((ss.params, ss.batch_stats, ss.opt_state),
                                    (sp.params, sp.batch_stats, sp.opt_state), rtol=1e-5, atol=1e-7)

    @parameterized.parameters("pmap", "shard_map")
    def test_batch_stats_synced(self, mode):
        _, before, after = _run_parallel(mode, False, 0.3)
        mean_before = np.asarray(before["bn"]["mean"])  # [devices, channels]
        self.assertGreater(np.ptp(mean_before, axis=0).max(), 1e-4)  # devices disagreed
        np.testing.assert_allclose(after.batch_stats["bn"]["mean"], mean_before.mean(0),
                                   rtol=1e-5, atol=1e-7)

    @parameterized.parameters("pmap", "shard_map")
    def test_eval_sums_over_devices(self, mode):
        state = _init()
        dp = parallel.DataParallel(mode)
        batch = h.fake_batches(1, GLOBAL_BATCH, seed=3)[0]
        batch["mask"] = np.arange(GLOBAL_BATCH) < 27  # a padded final batch
        step = dp.map(functools.partial(ts.eval_step, axis_name="batch"))
        sums = dp.unreplicate(step(dp.replicate(jax.tree_util.tree_map(np.asarray, state)),
                                   dp.shard(h.split_devices(batch, N))))
        ref = jax.device_get(ts.eval_step(state, batch))
        self.assertEqual(float(sums["count"]), 27.0)
        chex.assert_trees_all_close(sums, ref, rtol=1e-5)

    def test_batch_not_divisible(self):
        with self.assertRaisesRegex(ValueError, "not divisible by the 8 devices"):
            parallel.check_batch_size(12)
        self.assertEqual(parallel.check_batch_size(16), 2)


if __name__ == "__main__":
    absltest.main()
