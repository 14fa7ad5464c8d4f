"""The per-device train/eval steps on one device (multi-device runs are in test_parallel.py)."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _train_helpers as h
from _forward import shortened
from cnn_jax import configs, input_pipeline
from cnn_jax import train_step as ts
from cnn_jax.models import create_model, list_models


def _state(model=None, tx=None, image_size=8, dtype=jnp.float32):
    model = model or h.tiny_module()
    tx = tx or optax.sgd(0.1, momentum=0.9)
    return ts.create_train_state(model, tx, jax.random.PRNGKey(0), (image_size,) * 2 + (3,),
                                 dtype)


class TrainStepTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_updates_everything(self):
        state = _state()
        batch = h.fake_batches(1, 16)[0]
        step = self.variant(ts.train_step)
        new_state, metrics = step(state, batch)
        self.assertEqual(int(new_state.step), 1)
        for k in ("loss", "cross_entropy", "accuracy", "grad_norm"):
            self.assertTrue(np.isfinite(float(metrics[k])), k)
        chex.assert_trees_all_equal_shapes(new_state.params, state.params)
        changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new_state.params,
                                         state.params)
        self.assertTrue(all(jax.tree_util.tree_leaves(changed)))
        # BN running statistics moved towards this batch's statistics.
        self.assertFalse(np.allclose(new_state.batch_stats["bn"]["mean"],
                                     state.batch_stats["bn"]["mean"]))


def test_step_donates_its_state():
    state = jax.tree_util.tree_map(jnp.array, _state())
    step = jax.jit(ts.train_step, donate_argnums=(0,))
    new_state, _ = step(state, h.fake_batches(1, 8)[0])
    jax.block_until_ready(new_state)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.params))


def _copied_parameters(compiled_text):
    """The entry parameters (state and batch arrays) that a compiled program copies."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    params = set(re.findall(r"(%[\w.\-]+) = \S+ parameter\(", entry))
    return [name for name in re.findall(r" copy\((%[\w.\-]+)\)", entry) if name in params]


@pytest.mark.parametrize("ordered", [True, False])
def test_donated_step_writes_parameters_in_place(ordered, monkeypatch):
    """The update reads ``after(params, grad_norm + metrics, IN_PLACE_MIN_SIZE)`` (see there): a
    ResNet's jitted train step then copies none of its donated parameters of that size (here
    every one, the threshold lowered to 0); above every parameter's size XLA copies most of
    them."""
    monkeypatch.setattr(ts, "IN_PLACE_MIN_SIZE", 0 if ordered else 1 << 40)
    model = create_model(h.TINY_ARCH, num_classes=10, **h.TINY_MODEL)
    state = _state(model)
    step = jax.jit(ts.train_step, donate_argnums=(0,))
    copied = _copied_parameters(step.lower(state, h.fake_batches(1, 4)[0]).compile().as_text())
    params = len(jax.tree_util.tree_leaves(state.params))
    if ordered:
        assert copied == []
    else:
        assert len(copied) > params // 2
    tree = {"small": jnp.ones(3), "large": jnp.ones(5)}
    out = ts.after(tree, jnp.float32(7.0), min_size=4)
    assert out["small"] is tree["small"] and np.array_equal(out["large"], tree["large"])
    assert np.isnan(ts.after(tree, jnp.float32(np.inf))["small"]).all()


def test_one_device_steps_without_a_device_axis_or_copies_of_its_state():
    """parallel.DataParallel on one device: the step is jitted over arrays without the device
    axis, and its compiled program copies none of the donated state (the same step mapped over
    the device axis copies every parameter and moment before updating it); the state comes out
    as the mapped step's within float32 rounding (the two programs fuse the update differently)."""
    from cnn_jax import parallel

    model = h.tiny_module()
    # SGD with momentum: Adam would turn the conv bias's rounding-level gradients (BN follows it)
    # into full-size steps of either sign.
    tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
    host = jax.tree_util.tree_map(np.asarray, _state(model, tx))
    batches = [h.split_devices(b, 1) for b in h.fake_batches(3, 16)]
    runs = {}
    for single in (True, False):
        dp = parallel.DataParallel("pmap")
        assert dp.single and dp.num_devices == 1
        dp.single = single  # False: the mapped program, as on several devices
        step = dp.map(functools.partial(ts.train_step, axis_name=dp.axis_name),
                      donate_argnums=(0,))
        state = dp.replicate(host)
        shapes = [x.shape for x in jax.tree_util.tree_leaves(state.params)]
        assert (shapes == [x.shape for x in jax.tree_util.tree_leaves(host.params)]) == single
        copied = _copied_parameters(step.lower(state, dp.shard(batches[0])).compile().as_text())
        losses = []
        for batch in batches:
            state, metrics = step(state, dp.shard(batch))
            losses.append(float(dp.unreplicate(metrics)["loss"]))
        runs[single] = copied, losses, dp.unreplicate(state)
    (copied, losses, state), (mapped_copied, mapped_losses, mapped) = runs[True], runs[False]
    assert copied == [] and len(mapped_copied) >= len(jax.tree_util.tree_leaves(host.params))
    np.testing.assert_allclose(losses, mapped_losses, rtol=1e-6)
    assert int(state.step) == int(mapped.step) == 3
    chex.assert_trees_all_close((state.params, state.opt_state, state.batch_stats),
                                (mapped.params, mapped.opt_state, mapped.batch_stats),
                                rtol=1e-5, atol=1e-7)


def test_mixed_precision_keeps_fp32_params_and_optimizer_state():
    tx = optax.sgd(0.1, momentum=0.9)
    s32 = _state(h.tiny_module(), tx)
    model16 = h.tiny_module().clone(dtype=jnp.bfloat16)
    s16 = ts.create_train_state(model16, tx, jax.random.PRNGKey(0), (8, 8, 3), jnp.bfloat16)
    batch = h.fake_batches(1, 16)[0]
    out = model16.apply({"params": s16.params, "batch_stats": s16.batch_stats},
                        jnp.asarray(batch["image"], jnp.bfloat16))
    assert out.dtype == jnp.bfloat16  # computed in bf16 ...
    new16, m16 = jax.jit(ts.train_step)(s16, {**batch, "image": batch["image"].astype(jnp.bfloat16)})
    for tree in (new16.params, new16.opt_state, new16.batch_stats):  # ... stored in fp32
        for leaf in jax.tree_util.tree_leaves(tree):
            assert leaf.dtype == jnp.float32, leaf.dtype
    assert m16["loss"].dtype == jnp.float32
    _, m32 = jax.jit(ts.train_step)(s32, batch)
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)


def test_label_smoothing():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 2])
    eps = 0.1
    logp = jax.nn.log_softmax(logits)
    target = np.full((2, 3), eps / 3) + (1 - eps) * np.eye(3)[[0, 2]]
    np.testing.assert_allclose(ts.cross_entropy(logits, labels, eps), -(target * logp).sum(-1),
                               rtol=1e-6)
    np.testing.assert_allclose(ts.cross_entropy(logits, labels), -logp[[0, 1], [0, 2]], rtol=1e-6)


def test_auxiliary_losses_added_with_weight():
    """GoogLeNet-style (logits, aux) outputs: loss = CE(logits) + weight * CE(aux)."""
    model = h.tiny_module(aux=True)
    state = _state(model)
    batch = h.fake_batches(1, 16)[0]
    _, metrics = jax.jit(functools.partial(ts.train_step, aux_loss_weight=0.3))(state, batch)
    (logits, aux), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                   batch["image"], train=True, mutable=["batch_stats"])
    ce = ts.cross_entropy(logits, batch["label"]).mean()
    ce_aux = ts.cross_entropy(aux, batch["label"]).mean()
    np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ce + 0.3 * ce_aux, rtol=1e-5)
    # Evaluation uses the main logits only (aux heads are train-only).
    sums = ts.eval_step(state, batch)
    assert float(sums["count"]) == 16


def test_dropout_rng_folds_step_then_device():
    state = _state(h.tiny_module(dropout=0.5))
    keys = jax.vmap(lambda s: jax.random.key_data(ts.step_rng(s, "d")), axis_name="d",
                    in_axes=None, axis_size=4)(state)
    later = jax.random.key_data(ts.step_rng(state.replace(step=state.step + 1), None))
    first = jax.random.key_data(ts.step_rng(state, None))
    rows = {tuple(np.asarray(k)) for k in keys} | {tuple(np.asarray(later))}
    assert len(rows) == 5  # every device and every step gets its own key
    np.testing.assert_array_equal(keys[0], first)  # device 0 == the single-device key
    # Dropout is active in training: two steps with different keys see different losses.
    batch = h.fake_batches(1, 16)[0]
    step = jax.jit(ts.train_step)
    _, m1 = step(state, batch)
    _, m2 = step(state.replace(rng=jax.random.key_data(jax.random.PRNGKey(7))), batch)
    assert float(m1["loss"]) != float(m2["loss"])


def test_cross_device_batch_norm_under_vmap():
    """batch_norm_axis: BN over a named axis (here vmap's) == BN over the whole batch."""
    model = h.tiny_module()
    state = _state(model)
    x = h.fake_batches(1, 16)[0]["image"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def apply(x, axis):
        with ts.batch_norm_axis(axis):
            return model.apply(variables, x, train=True, mutable=["batch_stats"])

    full, full_stats = apply(x, None)
    split, split_stats = jax.vmap(lambda xs: apply(xs, "d"), axis_name="d")(x.reshape(4, 4, 8, 8, 3))
    np.testing.assert_allclose(split.reshape(16, -1), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split_stats["batch_stats"]["bn"]["mean"][0],
                               full_stats["batch_stats"]["bn"]["mean"], rtol=1e-5, atol=1e-7)
    local, _ = jax.vmap(lambda xs: apply(xs, None))(x.reshape(4, 4, 8, 8, 3))
    assert not np.allclose(local.reshape(16, -1), full, atol=1e-3)  # per-device BN differs


def test_eval_step_masked_sums():
    state = _state()
    batch = h.fake_batches(1, 16, seed=4)[0]
    batch["mask"] = np.arange(16) < 11
    sums = jax.jit(ts.eval_step)(state, batch)
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"])
    logits, labels, m = np.asarray(logits), batch["label"], batch["mask"]
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert float(sums["count"]) == 11
    assert float(sums["top1"]) == np.sum((logits.argmax(-1) == labels) & m)
    assert float(sums["top5"]) == np.sum((top5 == labels[:, None]).any(-1) & m)
    ce = -jax.nn.log_softmax(logits)[np.arange(16), labels]
    np.testing.assert_allclose(float(sums["loss"]), np.sum(ce * m), rtol=1e-5)
    summary = ts.summarize_eval(jax.device_get(sums))
    assert summary["count"] == 11 and 0 <= summary["top1"] <= summary["top5"] <= 1


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    input_pipeline.prepare_dataset(h.TINY_DATASET, data_dir, image_size=32)
    return data_dir


def test_loss_falls_on_shapes(tiny_shapes):
    """A small registered model fits a few `shapes` batches: its loss on them falls a lot."""
    model = create_model(h.TINY_ARCH, num_classes=10,
                         **configs.parse_model_kwargs("stage_sizes=(1, 1, 1), widths=(8, 16, 16)"))
    state = _state(model, optax.adam(3e-3), image_size=32)
    it = input_pipeline.create_train_iterator(h.TINY_DATASET, tiny_shapes, 32, 32,
                                              num_local_devices=1, process_index=0,
                                              process_count=1, augment="none")
    batches = [{k: v[0] for k, v in next(it).items()} for _ in range(2)]
    step = jax.jit(ts.train_step, donate_argnums=(0,))
    evaluate = jax.jit(ts.eval_step)

    def loss(state):
        return sum(float(evaluate(state, b)["loss"]) for b in batches) / 64

    before = loss(state)
    for i in range(40):
        state, _ = step(state, batches[i % 2])
    after = loss(state)
    assert before > 1.9 and after < 0.5 * before, (before, after)


# One architecture per family and input layout: the default config's image size must fit, and
# the full train step (aux heads included) must trace. eval_shape: no compilation, no compute.
# (Every registered name passes this; the deep ones take long to trace, so the test keeps one
# per family, and densenet121 runs shortened (_forward.shortened: two layers per dense block):
# the same stem, layer and transition modules, so the same spatial sizes at every stage, in a
# fifth of the trace (its full-depth trace of init, train and eval step: 13-21 s).)
REPRESENTATIVE = ["alexnet", "vgg11", "googlenet", "resnet18", "resnet20", "densenet121"]
SHORTENED = ("densenet121",)


@pytest.mark.parametrize("arch", REPRESENTATIVE)
def test_default_config_fits_every_family(arch):
    if arch not in list_models():
        pytest.skip(f"{arch} is not registered yet")
    config = configs.load(configs.DEFAULT_CONFIG, arch)
    model = create_model(arch, num_classes=10,
                         **(shortened(arch) if arch in SHORTENED else {}))
    size = config.image_size
    state = jax.eval_shape(lambda: _state(model, image_size=size))
    batch = {"image": jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    new_state, metrics = jax.eval_shape(ts.train_step, state, batch)
    assert metrics["loss"].shape == ()
    sums = jax.eval_shape(ts.eval_step, new_state, batch)
    assert sums["top1"].shape == ()


def test_evaluate_keeps_a_small_eval_split_and_reuses_it(tiny_shapes, monkeypatch):
    """train_lib.evaluate with a cache: the second pass reads no pipeline and gives the same sums;
    a split too large for the cache is read every time."""
    from cnn_jax import parallel, train_lib

    config = configs.load(configs.DEFAULT_CONFIG, "resnet20")
    config.dataset, config.data_dir, config.image_size = h.TINY_DATASET, tiny_shapes, 32
    config.eval_batch_size = 16
    dp = parallel.DataParallel("pmap", devices=jax.local_devices()[:1])
    state = dp.replicate(_state(image_size=32))
    p_eval = dp.map(functools.partial(ts.eval_step, axis_name=dp.axis_name))
    cache = train_lib.eval_cache_for(config, 64)
    assert cache == [] and train_lib.eval_cache_for(config, 10 ** 6) is None  # 12 GB: not kept
    fresh = train_lib.evaluate(p_eval, state, dp, config)
    first = train_lib.evaluate(p_eval, state, dp, config, cache=cache)
    assert len(cache) == 4 and first == fresh and first["count"] == 64

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the cached split was read again")

    monkeypatch.setattr(input_pipeline, "create_eval_iterator", no_pipeline)
    assert train_lib.evaluate(p_eval, state, dp, config, cache=cache) == first
    assert len(cache) == 4


def test_global_norm_equals_optax_tree_norm():
    """The step's grad_norm metric (lax primitives) is optax.tree.norm's value, in float32 for
    bfloat16 leaves too."""
    rng = np.random.default_rng(0)
    tree = {"a": {"kernel": rng.standard_normal((3, 3, 4, 8), dtype=np.float32),
                  "bias": rng.standard_normal(8, dtype=np.float32)},
            "b": np.float32(-2.5), "c": [rng.standard_normal((5, 7), dtype=np.float32)]}
    np.testing.assert_allclose(ts.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)
    half = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)
    norm = ts.global_norm(half)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, optax.tree.norm(jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32), half)), rtol=1e-6)
    assert float(ts.global_norm({"w": 3.0, "b": [4.0]})) == 5.0 and float(ts.global_norm({})) == 0.0


def test_equal_models_share_one_compiled_init():
    """A new instance of the same network (another seed) reuses the jitted init; its variables
    are those of an uncached jitted init with the same key."""
    cls = type(h.tiny_module())
    a, b = cls(), cls()
    assert a is not b and ts._jitted_init(a) is ts._jitted_init(b)
    assert ts._jitted_init(cls(num_classes=3)) is not ts._jitted_init(a)
    before = ts._jitted_init(a)._cache_size()
    states = [ts.create_train_state(m, optax.identity(), jax.random.PRNGKey(s), (8, 8, 3))
              for m, s in ((a, 0), (b, 1), (cls(), 0))]
    assert ts._jitted_init(a)._cache_size() - before <= 1
    chex.assert_trees_all_equal(states[0].params, states[2].params)
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(states[0].params), jax.tree_util.tree_leaves(states[1].params)))
    init_rng, _ = jax.random.split(jax.random.PRNGKey(0))
    params_rng, dropout_rng = jax.random.split(init_rng)
    with jax.threefry_partitionable(False):
        direct = jax.jit(functools.partial(a.init, train=True))(
            {"params": params_rng, "dropout": dropout_rng}, jnp.zeros((1, 8, 8, 3)))
    chex.assert_trees_all_equal(states[0].params, direct["params"])
