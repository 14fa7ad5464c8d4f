"""Modern augmentation: each TF op eagerly and inside tf.data, mixup/CutMix eagerly and jitted,
determinism per seed, and ResNet's stochastic depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from cnn_jax import augment, preprocessing
from cnn_jax.models import create_model

IMAGE = np.random.RandomState(0).randint(0, 256, (24, 24, 3)).astype(np.float32)
SEED = tf.constant([3, 4], tf.int64)


def _in_tf_data(fn, image=IMAGE):
    """``fn(image)`` run as a tf.data map (graph mode), as the input pipeline runs it."""
    ds = tf.data.Dataset.from_tensors(tf.constant(image)).map(fn)
    return next(iter(ds)).numpy()


@pytest.mark.parametrize("wide", [True, False], ids=["wide", "rand"])
def test_every_op_eager_equals_tf_data(wide):
    space = augment._space(wide, float(IMAGE.shape[1]))

    def all_ops(x):  # every op at bin 20, negated where signed
        return tuple(op(x, -mags[20] if signed else mags[20]) for _, op, signed, mags in space)

    eager = [o.numpy() for o in all_ops(tf.constant(IMAGE))]
    graph = _in_tf_data(lambda x: tf.stack(all_ops(x)))
    for (name, *_), e, g in zip(space, eager, graph):
        assert e.shape == IMAGE.shape and e.dtype == np.float32, name
        assert e.min() >= 0 and e.max() <= 255, name
        np.testing.assert_array_equal(e, g, err_msg=name)
        if name == "identity":
            np.testing.assert_array_equal(e, IMAGE)
        elif name != "autocontrast":  # a random image already spans 0..255
            assert not np.array_equal(e, IMAGE), f"{name} at magnitude bin 20 changed nothing"
    assert tuple(name for name, *_ in space) == augment.OP_NAMES


def test_op_semantics():
    img = tf.constant(IMAGE)
    np.testing.assert_array_equal(augment.solarize(img, 0.0).numpy(), 255.0 - IMAGE)
    np.testing.assert_array_equal(augment.posterize(img, 8.0).numpy(), IMAGE)
    assert set(np.unique(augment.posterize(img, 1.0).numpy())) <= {0.0, 128.0}
    shifted = augment.translate_x(img, 5.0).numpy()
    np.testing.assert_array_equal(shifted[:, 5:], IMAGE[:, :-5])
    assert not shifted[:, :5].any()  # black fill
    np.testing.assert_allclose(augment.rotate(img, 360.0).numpy(), IMAGE)
    dark = IMAGE * 0.5
    stretched = augment.autocontrast(tf.constant(dark), 0.0).numpy()
    assert stretched.min() == 0 and stretched.max() == 255


@pytest.mark.parametrize("fn", [
    lambda x, s: augment.trivial_augment(x, s),
    lambda x, s: augment.rand_augment(x, s, num_ops=2, magnitude=9),
    lambda x, s: augment.random_erasing(x, s, probability=1.0),
], ids=["trivial_augment", "rand_augment", "random_erasing"])
def test_policies_are_deterministic_per_seed(fn):
    outs = [fn(tf.constant(IMAGE), tf.constant([s, 0], tf.int64)).numpy() for s in range(6)]
    again = fn(tf.constant(IMAGE), tf.constant([0, 0], tf.int64)).numpy()
    np.testing.assert_array_equal(outs[0], again)
    np.testing.assert_array_equal(outs[0], _in_tf_data(lambda x: fn(x, tf.constant([0, 0],
                                                                                  tf.int64))))
    assert len({o.tobytes() for o in outs}) > 1  # seeds differ -> outputs differ


def test_random_erasing_area_and_probability():
    erased = augment.random_erasing(tf.constant(IMAGE + 1.0), SEED, probability=1.0).numpy()
    mask = (erased == 0).all(-1)
    frac = mask.mean()
    assert 0.01 <= frac <= 0.34
    ys, xs = np.nonzero(mask)  # one rectangle
    assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    untouched = augment.random_erasing(tf.constant(IMAGE), SEED, probability=0.0).numpy()
    np.testing.assert_array_equal(untouched, IMAGE)


def test_preprocess_for_train_with_modern_options():
    png = tf.io.encode_png(tf.constant(IMAGE.astype(np.uint8))).numpy()
    base = preprocessing.parse_augment("none,flip=true")
    modern = preprocessing.parse_augment("none,flip=true,auto_augment=rand_augment,"
                                         "random_erasing=1.0")

    def run(cfg):
        return lambda b: preprocessing.preprocess_for_train(b, SEED, 16, jpeg=False, augment=cfg)

    plain = run(base)(tf.constant(png)).numpy()
    out = run(modern)(tf.constant(png)).numpy()
    assert out.shape == (16, 16, 3) and not np.array_equal(out, plain)
    ds = tf.data.Dataset.from_tensors(tf.constant(png)).map(run(modern))
    np.testing.assert_array_equal(next(iter(ds)).numpy(), out)
    preset = preprocessing.parse_augment("torchvision_v2")
    assert (preset.auto_augment, preset.random_erasing, preset.crop) == (
        "trivial_augment", 0.1, "random_resized")
    with pytest.raises(ValueError, match="unknown auto_augment 'autoaugment'"):
        preprocessing.parse_augment("auto_augment=autoaugment")


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_mixup_cutmix_eager_equals_jit(op):
    rng = np.random.RandomState(1)
    images = jnp.asarray(rng.randn(4, 8, 8, 3).astype(np.float32))
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
    fn = getattr(augment, op)
    key = jax.random.PRNGKey(5)
    mixed, y, y2, lam = fn(key, images, labels, 1.0)
    jitted = jax.jit(fn, static_argnums=3)(key, images, labels, 1.0)
    np.testing.assert_allclose(mixed, jitted[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lam, jitted[3], rtol=1e-6)
    np.testing.assert_array_equal(y2, jnp.roll(labels, 1))
    assert 0.0 <= float(lam) <= 1.0
    partner = jnp.roll(images, 1, axis=0)
    if op == "mixup":
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * partner, rtol=1e-5,
                                   atol=1e-6)
    else:  # every pixel comes from one of the two; the partner's share is 1 - lam
        from_partner = np.all(np.asarray(mixed) == np.asarray(partner), axis=(0, 3))
        from_self = np.all(np.asarray(mixed) == np.asarray(images), axis=(0, 3))
        assert np.all(from_partner | from_self)
        np.testing.assert_allclose(from_partner.mean(), 1 - float(lam), atol=1e-6)
    again = fn(key, images, labels, 1.0)
    np.testing.assert_array_equal(again[0], mixed)
    assert augment.mix_batch(key, images, labels, 0.0, 0.0) is None
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        augment.check_mix_options(-1.0, 0.0)


def test_resnet_stochastic_depth():
    kwargs = dict(stage_sizes=(1, 1, 1), widths=(4, 8, 8), num_classes=10)
    model = create_model("resnet20", drop_path_rate=0.5, **kwargs)
    plain = create_model("resnet20", **kwargs)
    x = jnp.asarray(np.random.RandomState(0).randn(8, 16, 16, 3).astype(np.float32))
    variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)) \
        == jax.tree_util.tree_structure(variables)  # no new parameters
    np.testing.assert_allclose(jax.jit(model.apply)(variables, x),
                               jax.jit(plain.apply)(variables, x), rtol=1e-6)

    @jax.jit
    def train(rng):
        return model.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": rng})[0]

    a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, train(jax.random.PRNGKey(1)))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        create_model("resnet20", drop_path_rate=1.0, **kwargs)
