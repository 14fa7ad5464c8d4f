"""Registry-wide checks that every model honours the one model interface (abstract: no compute;
real forward passes of every model are in test_forward_jit.py and test_forward_eager.py)."""

import chex
import jax
import jax.numpy as jnp
import pytest

from cnn_jax.models import count_params, create_model, list_models

from _variables import abstract_init

# torchvision's published parameter counts at 1000 classes (issue 3): the layouts must stay
# weight-compatible with torchvision, so these are exact.
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "densenet121": 7_978_856, "densenet161": 28_681_000,
    "densenet169": 14_149_480, "densenet201": 20_013_928,
}
GOOGLENET_WITH_AUX_PARAMS = 13_004_888

ALL_MODELS = list_models()


def test_registry_has_every_family():
    for name in list(TORCHVISION_PARAMS) + ["alexnet_original", "vgg16_c", "resnet20", "resnet110",
                                            "plain20", "plain110", "densenet_bc_100"]:
        assert name in ALL_MODELS, name


def test_list_models_pattern():
    assert list_models("resnet1*") == ["resnet101", "resnet110", "resnet152", "resnet18"]
    assert list_models("no_such*") == []


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet5'.*resnet50"):
        create_model("resnet5")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"resnet18.*no_such_option"):
        create_model("resnet18", no_such_option=1)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
    out, variables = abstract_init(create_model(name, num_classes=1000))
    assert count_params(variables["params"]) == TORCHVISION_PARAMS[name]
    chex.assert_shape(out, (1, 1000))


def test_googlenet_aux_param_count():
    _, variables = abstract_init(create_model("googlenet", aux_logits=True))
    assert count_params(variables["params"]) == GOOGLENET_WITH_AUX_PARAMS


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_at_224_num_classes_and_bf16_compute(name):
    """At 224x224 and another class count, every model gives (batch, num_classes) logits; with
    dtype=bfloat16 it computes them in bfloat16 and keeps every variable in float32. One trace
    checks the three (shapes do not depend on the compute dtype); float32 is the default of the
    torchvision-count test above and of the registry's real forward tests."""
    out, variables = abstract_init(create_model(name, num_classes=7, dtype=jnp.bfloat16), 224,
                                   batch=2)
    chex.assert_shape(out, (2, 7))
    assert out.dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == jnp.float32
