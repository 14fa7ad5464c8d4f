"""The test-time protocols on crafted inputs: the exact crops, scales, flips and averages."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cnn_jax import preprocessing, protocols
from cnn_jax.models import create_model

MEAN, STD = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return tf.constant(buf.getvalue())


def _coded(h, w):
    """Every pixel says where it is: (6y, 5x, y + 2x) mod 256."""
    y, x = np.mgrid[:h, :w]
    return np.stack([6 * y % 256, 5 * x % 256, (y + 2 * x) % 256], -1)


def _pixels(view):
    return np.asarray(view, np.float64) * STD * 255 + MEAN * 255


def test_ten_crop_views_are_the_four_corners_and_the_centre():
    image = _coded(40, 46)  # shorter side 40 = 35 / 0.875: no resize, the crops are exact slices
    views = protocols.ten_crop_views(_png(image), 35, jpeg=False, crop_ratio=0.875)["image"]
    assert views.shape == (5, 35, 35, 3)
    for view, (y, x) in zip(views, [(0, 0), (0, 11), (5, 0), (5, 11), (3, 6)]):
        np.testing.assert_allclose(_pixels(view), image[y:y + 35, x:x + 35], atol=1e-3)


def test_multiscale_views_are_central_squares_at_the_three_scales():
    assert protocols.multiscale_sides(224) == (256, 384, 512)
    assert protocols.multiscale_sides(28) == (32, 48, 64)
    image = _coded(32, 40)  # shorter side 32 = the first scale: no resize
    views = protocols.multiscale_views(_png(image), 28, jpeg=False)
    assert [v.shape for v in views.values()] == [(32, 32, 3), (48, 48, 3), (64, 64, 3)]
    np.testing.assert_allclose(_pixels(views["scale0"]), image[:, 4:36], atol=1e-3)
    flat = np.full((32, 40, 3), (10, 120, 240))  # a constant image stays constant at any scale
    for view in protocols.multiscale_views(_png(flat), 28, jpeg=False).values():
        np.testing.assert_allclose(_pixels(view), np.broadcast_to((10, 120, 240), view.shape),
                                   atol=1e-3)


def _apply(x):
    """Logits that depend on size-independent, flip-sensitive statistics of the input."""
    ramp = jnp.linspace(0.0, 1.0, x.shape[2])[None, None, :, None]
    m = jnp.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [2.0, 0.5, 1.0, -3.0]])
    return jnp.einsum("nhwc,ck->nk", x * ramp, m) / (x.shape[1] * x.shape[2])


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _expected(views):
    """log of the mean softmax over the views and their horizontal flips (numpy)."""
    probs = [_softmax(np.asarray(_apply(jnp.asarray(v)), np.float64))
             for view in views for v in (view, view[:, :, ::-1])]
    return np.log(np.mean(probs, axis=0))


def test_average_log_probs_is_the_mean_softmax_over_views_and_flips():
    rng = np.random.default_rng(0)
    crops = rng.standard_normal((2, 5, 8, 8, 3)).astype(np.float32)
    got = protocols.average_log_probs(_apply, {"image": jnp.asarray(crops)}, "ten_crop")
    np.testing.assert_allclose(got, _expected([crops[:, i] for i in range(5)]), atol=1e-5)

    scales = {f"scale{i}": rng.standard_normal((2, s, s, 3)).astype(np.float32)
              for i, s in enumerate((9, 13, 18))}
    got = protocols.average_log_probs(_apply, {k: jnp.asarray(v) for k, v in scales.items()},
                                      "multiscale")
    np.testing.assert_allclose(got, _expected(list(scales.values())), atol=1e-5)

    centre = crops[:, 0]
    got = protocols.average_log_probs(_apply, {"image": jnp.asarray(centre)}, "center")
    want = np.log(_softmax(np.asarray(_apply(jnp.asarray(centre)), np.float64)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_metric_sums_count_masked_examples_once():
    log_probs = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]))
    sums = protocols.metric_sums(log_probs, jnp.array([0, 1, 2]), jnp.array([True, True, False]))
    assert float(sums["count"]) == 2 and float(sums["top1"]) == 1 and float(sums["top5"]) == 2
    np.testing.assert_allclose(float(sums["loss"]), -np.log(0.7) - np.log(0.3), rtol=1e-6)


def test_costs_and_models():
    assert protocols.relative_cost("center") == 1 and protocols.relative_cost("ten_crop") == 10
    assert protocols.relative_cost("multiscale") == pytest.approx(18.94, abs=0.01)
    vgg = protocols.protocol_model(create_model("vgg11", num_classes=10), "multiscale")
    assert vgg.fully_conv and not create_model("vgg11").fully_conv
    with pytest.raises(ValueError, match="AlexNet pools adaptively"):
        protocols.protocol_model(create_model("alexnet"), "multiscale")
    with pytest.raises(ValueError, match="unknown protocol 'dense'"):
        protocols.views_fn("dense", 32)
