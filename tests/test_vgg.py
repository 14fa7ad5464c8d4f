"""VGG: configurations A-E, C and A-LRN, batch norm, and the fully-convolutional evaluation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cnn_jax.models import count_params, create_model, list_models
from cnn_jax.models.vgg import CONFIGS, VGG, torchvision_names

from _dropout import check_dropout_modes
from _variables import abstract_variables, fast_init, normal

PARAMS = {
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg11_lrn": 132_863_336,  # LRN has no params
    "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    # D less the 3x3 -> 1x1 savings of conv3_3, conv4_3, conv5_3: 8 * (256^2 + 2 * 512^2).
    "vgg16_c": 138_357_544 - 8 * (256**2 + 2 * 512**2),
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
}
# A tiny configuration (5 pools, like every VGG) for real forward passes at 224x224.
TINY = (8, "M", 8, "M", 16, "M", 16, "M", 16, "M")


def _lrn_reference(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """Krizhevsky et al. (2012), Sec. 3.3: a / (k + alpha * sum of squares over n channels)^beta."""
    out = np.empty_like(a)
    channels = a.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        out[..., c] = a[..., c] / (k + alpha * np.sum(a[..., lo:hi + 1] ** 2, axis=-1)) ** beta
    return out


def test_registered_names():
    assert list_models("vgg*") == sorted(PARAMS)


# torchvision's eight are checked with the registry's other torchvision counts (test_models.py).
@pytest.mark.parametrize("name", ["vgg11_lrn", "vgg16_c"])
def test_param_counts(name):
    assert count_params(abstract_variables(create_model(name))["params"]) == PARAMS[name]


def test_bn_variants_keep_the_conv_bias_like_torchvision():
    params = abstract_variables(create_model("vgg11_bn"))["params"]
    assert set(params["conv1_1"]) == {"kernel", "bias"}
    assert set(params["bn1_1"]) == {"scale", "bias"}


def test_config_c_has_1x1_convs_last_in_blocks_3_to_5():
    c = abstract_variables(create_model("vgg16_c"))["params"]
    d = abstract_variables(create_model("vgg16"))["params"]
    assert set(c) == set(d)
    for name, p in c.items():
        if not name.startswith("conv"):
            continue
        expected = (1, 1) if name in ("conv3_3", "conv4_3", "conv5_3") else (3, 3)
        assert p["kernel"].shape[:2] == expected, name
        assert p["kernel"].shape[2:] == d[name]["kernel"].shape[2:], name


def test_every_conv_is_3x3_in_configs_a_to_e():
    for name in ("vgg11", "vgg13", "vgg16", "vgg19"):
        params = abstract_variables(create_model(name))["params"]
        convs = [p["kernel"].shape[:2] for n, p in params.items() if n.startswith("conv")]
        assert set(convs) == {(3, 3)}, name


@pytest.mark.parametrize("name,batch_norm,conv_indices", [
    ("vgg11", False, [0, 3, 6, 8, 11, 13, 16, 18]),
    ("vgg16", False, [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
    ("vgg16_bn", True, [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]),
])
def test_torchvision_names(name, batch_norm, conv_indices):
    model = create_model(name)
    mapping = torchvision_names(model.cfg, batch_norm)
    assert sorted(int(k.split(".")[1]) for k, v in mapping.items()
                  if v.startswith("conv")) == conv_indices
    if batch_norm:
        assert all(mapping[f"features.{i + 1}"].startswith("bn") for i in conv_indices)
    params = abstract_variables(model)["params"]
    assert set(mapping.values()) == set(params)
    # torch's classifier.0 weight is [4096, 512 * 7 * 7].
    assert params[mapping["classifier.0"]]["kernel"].shape == (512 * 7 * 7, 4096)


class VGGForwardTest(chex.TestCase):
    """Real forward passes at 32x32 (a small FC width keeps them cheap)."""

    # Jitted: the same contract un-jitted is test_forward_eager.py's (check_forward), all but the
    # dropout_rate=0 comparison, which check_dropout_modes runs un-jitted anyway.
    @chex.variants(with_jit=True)
    @parameterized.parameters("vgg11", "vgg11_bn")
    def test_eval_and_train_mode(self, name):
        model = create_model(name, num_classes=10, fc_features=32)
        x = normal(1, (2, 32, 32, 3))
        variables = fast_init(model, x)
        check_dropout_modes(model, variables, x, self.variant, num_classes=10)


def test_lrn_after_the_first_conv_of_config_a_lrn():
    model = create_model("vgg11_lrn", num_classes=3, fc_features=8)
    x = 50.0 * normal(1, (1, 32, 32, 3))
    variables = fast_init(model, x)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    assert [k for k in inter if k.startswith("lrn")] == ["lrn1_1"]
    a = np.maximum(np.asarray(inter["conv1_1"]["__call__"][0], np.float64), 0)
    got = np.asarray(inter["lrn1_1"]["__call__"][0])
    np.testing.assert_allclose(got, _lrn_reference(a), rtol=1e-5, atol=1e-6)
    # The next conv sees the pooled LRN output.
    np.testing.assert_allclose(inter["conv2_1"]["__call__"][0].shape[1:3], (16, 16))


def _dense_head_reference(params, feats):
    """The dense head slid over every 7x7 window of the feature map, then averaged (Sec. 3.2)."""
    feats = np.asarray(feats, np.float64)
    n, h, w, _ = feats.shape
    k = {name: np.asarray(params[name]["kernel"], np.float64) for name in ("fc6", "fc7", "fc8")}
    b = {name: np.asarray(params[name]["bias"], np.float64) for name in ("fc6", "fc7", "fc8")}
    scores = []
    for i in range(h - 6):
        for j in range(w - 6):
            y = feats[:, i:i + 7, j:j + 7].reshape(n, -1)
            y = np.maximum(y @ k["fc6"] + b["fc6"], 0)
            y = np.maximum(y @ k["fc7"] + b["fc7"], 0)
            scores.append(y @ k["fc8"] + b["fc8"])
    return np.mean(scores, axis=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fully_conv_equals_dense_head_at_224(batch_norm):
    model = VGG(num_classes=10, cfg=TINY, batch_norm=batch_norm, fc_features=32)
    x = normal(1, (2, 224, 224, 3))
    variables = fast_init(model, x)
    dense = model.apply(variables, x)
    conv = model.clone(fully_conv=True).apply(variables, x)
    chex.assert_shape(conv, (2, 10))
    np.testing.assert_allclose(conv, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_fully_conv_equals_dense_head_at_224_real_vgg16_trunk():
    model = create_model("vgg16", num_classes=10, fc_features=16)
    # Parameter shapes do not depend on the input size (adaptive pool), so init cheaply at 32.
    variables = fast_init(model, jnp.zeros((1, 32, 32, 3)))
    x = normal(1, (1, 224, 224, 3))
    dense = model.apply(variables, x)
    conv = model.clone(fully_conv=True).apply(variables, x)
    np.testing.assert_allclose(conv, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_fully_conv_averages_the_score_map_of_a_larger_image():
    model = VGG(num_classes=10, cfg=TINY, fc_features=32, fully_conv=True)
    x = normal(1, (2, 256, 320, 3))  # feature map 8x10 -> scores 2x4
    variables = fast_init(model, x)
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    chex.assert_shape(logits, (2, 10))
    chex.assert_shape(state["intermediates"]["score_map"][0], (2, 2, 4, 10))
    expected = _dense_head_reference(variables["params"], state["intermediates"]["features"][0])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_real_vgg16_fully_conv_at_384():
    model = create_model("vgg16", fully_conv=True)
    variables = abstract_variables(model)
    x = jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32)
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]),
                                variables, x)
    chex.assert_shape(out, (2, 1000))
    chex.assert_shape(state["intermediates"]["score_map"][0], (2, 6, 6, 1000))  # 12x12 map
    # Same parameter tree as the dense head: the paper converts a trained net, no new weights.
    dense = abstract_variables(create_model("vgg16"))
    assert jax.tree_util.tree_map(lambda a: a.shape, variables) == \
        jax.tree_util.tree_map(lambda a: a.shape, dense)


def test_torchvision_init():
    model = VGG(num_classes=10, cfg=(64, "M", 128, "M", 128, "M", 128, "M", 128, "M"),
                fc_features=256)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["conv2_1"]["kernel"])
    # Kaiming normal with fan_out = 3 * 3 * 128 (torch truncates nothing here).
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 128)), rtol=0.03)
    np.testing.assert_allclose(np.std(params["fc7"]["kernel"]), 0.01, rtol=0.03)
    for p in jax.tree_util.tree_leaves({k: v["bias"] for k, v in params.items()}):
        np.testing.assert_array_equal(p, 0.0)


def test_clear_errors():
    with pytest.raises(ValueError, match="at least 32x32"):
        abstract_variables(create_model("vgg11"), 31)
    with pytest.raises(ValueError, match="fully-convolutional.*at least 224x224"):
        abstract_variables(create_model("vgg11", fully_conv=True), 200)
    with pytest.raises(ValueError, match="bad VGG config entry"):
        abstract_variables(VGG(cfg=(64, "3x3:64", "M")))


def test_config_c_with_batch_norm_by_override():
    params = abstract_variables(create_model("vgg16_c", batch_norm=True))["params"]
    assert "bn5_3" in params and params["conv5_3"]["kernel"].shape[:2] == (1, 1)
    assert CONFIGS["C"].count("M") == 5
