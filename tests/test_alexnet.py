"""AlexNet: torchvision's layout and the 2012 paper's options (LRN, towers, pooling, tanh, init)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cnn_jax.models import count_params, create_model
from cnn_jax.models.alexnet import TORCHVISION_NAMES

from _dropout import check_dropout_modes
from _variables import abstract_variables, fast_init, normal

# torchvision alexnet's state_dict weight shapes ([O, I, kh, kw] and [out, in]).
TORCHVISION_SHAPES = {
    "features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5), "features.6": (384, 192, 3, 3),
    "features.8": (256, 384, 3, 3), "features.10": (256, 256, 3, 3),
    "classifier.1": (4096, 9216), "classifier.4": (4096, 4096), "classifier.6": (1000, 4096),
}


def _intermediates(model, variables, x):
    """Outputs of every submodule (and the sown pre-pool feature map) for one forward pass."""
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    return state["intermediates"]


def _map_sizes(model, size):
    """Spatial size of each conv's output and of the last map before the adaptive pool."""
    variables = abstract_variables(model, size)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    inter = jax.eval_shape(lambda v, x: _intermediates(model, v, x), variables, x)
    sizes = {f"conv{i}": inter[f"conv{i}"]["__call__"][0].shape[1] for i in range(1, 6)}
    sizes["features"] = inter["features"][0].shape[1]
    return sizes


def _lrn_reference(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """Krizhevsky et al. (2012), Sec. 3.3: a / (k + alpha * sum of squares over n channels)^beta."""
    out = np.empty_like(a)
    channels = a.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        out[..., c] = a[..., c] / (k + alpha * np.sum(a[..., lo:hi + 1] ** 2, axis=-1)) ** beta
    return out


def test_param_count_of_the_paper_layout():
    # torchvision's alexnet (61,100,840) is checked with the registry's other torchvision counts
    # (test_models.py); the paper's "60 million" with the two-tower split:
    assert count_params(abstract_variables(create_model("alexnet_original"))["params"]) == \
        60_965_224


def test_torchvision_names_map_to_transposed_shapes():
    params = abstract_variables(create_model("alexnet"))["params"]
    assert set(TORCHVISION_NAMES) == set(TORCHVISION_SHAPES)
    assert set(TORCHVISION_NAMES.values()) == set(params)
    for torch_name, torch_shape in TORCHVISION_SHAPES.items():
        kernel = params[TORCHVISION_NAMES[torch_name]]["kernel"]
        perm = (3, 2, 0, 1) if kernel.ndim == 4 else (1, 0)
        assert tuple(kernel.shape[p] for p in perm) == torch_shape, torch_name


class AlexNetForwardTest(chex.TestCase):
    """Real forward passes at 64x64 (a small FC width keeps them cheap)."""

    # Jitted: the same contract un-jitted is test_forward_eager.py's (check_forward), all but the
    # dropout_rate=0 comparison, which check_dropout_modes runs un-jitted anyway.
    @chex.variants(with_jit=True)
    @parameterized.parameters("alexnet", "alexnet_original")
    def test_eval_and_train_mode(self, name):
        model = create_model(name, num_classes=10, fc_features=64)
        x = normal(1, (2, 64, 64, 3))
        variables = fast_init(model, x)
        check_dropout_modes(model, variables, x, self.variant, num_classes=10)


@pytest.mark.parametrize("activation,act", [("relu", lambda a: np.maximum(a, 0)),
                                            ("tanh", np.tanh)])
def test_lrn_follows_the_activation_of_conv1_and_conv2(activation, act):
    model = create_model("alexnet_original", num_classes=3, fc_features=16, activation=activation)
    # Large inputs so the sum of squares matters: the denominators then vary across units.
    x = 50.0 * normal(1, (1, 67, 67, 3))
    variables = fast_init(model, x)
    inter = _intermediates(model, variables, x)
    assert {k for k in inter if k.startswith("lrn")} == {"lrn1", "lrn2"}
    for conv, lrn in (("conv1", "lrn1"), ("conv2", "lrn2")):
        a = act(np.asarray(inter[conv]["__call__"][0], np.float64))
        got = np.asarray(inter[lrn]["__call__"][0])
        np.testing.assert_allclose(got, _lrn_reference(a), rtol=1e-5, atol=1e-6)
    if activation == "tanh":
        return  # tanh outputs stay below 1, so LRN is a near-constant scale there
    a = act(np.asarray(inter["conv1"]["__call__"][0], np.float64))
    ratio = a[a > 1e-3] / np.asarray(inter["lrn1"]["__call__"][0])[a > 1e-3]
    assert ratio.max() - ratio.min() > 0.1, "LRN did not normalize anything at this scale"


def test_lrn_only_where_asked():
    x = jnp.zeros((1, 64, 64, 3))
    for name, overrides in (("alexnet", {}), ("alexnet_original", {"use_lrn": False})):
        model = create_model(name, num_classes=3, fc_features=16, **overrides)
        variables = abstract_variables(model, 64)
        inter = jax.eval_shape(lambda v: _intermediates(model, v, x), variables)
        assert not [k for k in inter if k.startswith("lrn")], name


def test_groups_split_conv2_conv4_conv5_into_two_towers():
    grouped = abstract_variables(create_model("alexnet_original"))["params"]
    single = abstract_variables(create_model("alexnet_original", groups=1))["params"]
    assert set(grouped) == set(single)
    for name in grouped:
        n_grouped, n_single = grouped[name]["kernel"].size, single[name]["kernel"].size
        if name in ("conv2", "conv4", "conv5"):
            assert 2 * n_grouped == n_single, name
            assert grouped[name]["kernel"].shape[2] * 2 == single[name]["kernel"].shape[2]
        else:  # conv1 sees the image, conv3 and the FC layers see both towers
            assert n_grouped == n_single, name
        assert grouped[name]["bias"].shape == single[name]["bias"].shape


def test_overlapping_pooling_keeps_the_papers_map_sizes():
    # Sec. 3.4: 3x3 windows at stride 2 give the same map sizes as 2x2 ones at 224 (227 in the
    # paper): 55 -> 27 -> 13 -> 6.
    for overlapping in (True, False):
        model = create_model("alexnet_original", overlapping_pool=overlapping)
        assert _map_sizes(model, 224) == {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13,
                                          "conv5": 13, "features": 6}, overlapping
    # An even conv1 map (56 at 228 px) tells them apart: (56 - 3) // 2 + 1 = 27 against 56 / 2.
    assert _map_sizes(create_model("alexnet", overlapping_pool=True), 228)["conv2"] == 27
    assert _map_sizes(create_model("alexnet", overlapping_pool=False), 228)["conv2"] == 28


def test_pooling_option_changes_the_output():
    model = create_model("alexnet_original", num_classes=5, fc_features=16)
    x = normal(1, (1, 64, 64, 3))
    variables = fast_init(model, x)  # same parameter shapes for both poolings
    overlapping = model.apply(variables, x)
    non_overlapping = model.clone(overlapping_pool=False).apply(variables, x)
    assert not np.allclose(overlapping, non_overlapping)


def test_tanh_option_runs_and_differs_from_relu():
    model = create_model("alexnet_original", num_classes=5, fc_features=16)
    x = normal(1, (2, 64, 64, 3))
    variables = fast_init(model, x)
    relu_out = model.apply(variables, x)
    tanh_out = model.clone(activation="tanh").apply(variables, x)
    chex.assert_shape(tanh_out, (2, 5))
    chex.assert_tree_all_finite(tanh_out)
    assert not np.allclose(relu_out, tanh_out)


def test_paper_init():
    model = create_model("alexnet_original", num_classes=5, fc_features=32, weight_init="paper")
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    for name, p in params.items():
        # Sec. 5: bias 1 in conv2, conv4, conv5 and the hidden FC layers, 0 elsewhere.
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        np.testing.assert_array_equal(p["bias"], expected_bias, err_msg=name)
    np.testing.assert_allclose(np.std(params["conv3"]["kernel"]), 0.01, rtol=0.02)


def test_torch_default_init_bound():
    params = create_model("alexnet", num_classes=5, fc_features=32).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    kernel = np.asarray(params["conv3"]["kernel"])
    bound = 1 / np.sqrt(3 * 3 * 192)  # torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.02)


def test_smallest_input_and_clear_errors():
    model = create_model("alexnet", num_classes=5)
    x = jax.ShapeDtypeStruct((1, 63, 63, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables(model, 63), x)
    chex.assert_shape(out, (1, 5))
    for size in (62, 8):
        with pytest.raises(ValueError, match="at least 63x63"):
            abstract_variables(model, size)
    with pytest.raises(ValueError, match="unknown activation"):
        abstract_variables(create_model("alexnet", activation="swishy"))
    with pytest.raises(ValueError, match="weight_init"):
        abstract_variables(create_model("alexnet", weight_init="xavier"))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        abstract_variables(create_model("alexnet_original", groups=3))
    with pytest.raises(ValueError, match="widths"):
        abstract_variables(create_model("alexnet", widths=(64, 192)))
