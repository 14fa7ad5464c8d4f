"""Registry-wide checks that every model honours the one model interface."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from cnn_jax.models import count_params, create_model, list_models, model_info
from cnn_jax.models.layers import split_logits

from _variables import fast_init

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
# Families whose classifier uses dropout (DenseNet's drop_rate defaults to 0, ResNet has none).
HAS_DROPOUT = ("alexnet", "vgg", "googlenet")


def _size(name):
    """32x32, or the next multiple of 32 that the registry entry's minimum input allows."""
    return max(32, -(-model_info(name).min_input_size // 32) * 32)


def _abstract_init(model, size=224):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


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
    variables = _abstract_init(create_model(name, num_classes=1000))
    assert count_params(variables["params"]) == TORCHVISION_PARAMS[name]


def test_googlenet_aux_param_count():
    variables = _abstract_init(create_model("googlenet", aux_logits=True))
    assert count_params(variables["params"]) == GOOGLENET_WITH_AUX_PARAMS


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_at_224_and_num_classes(name):
    model = create_model(name, num_classes=7)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = _abstract_init(model)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    chex.assert_shape(out, (2, 7))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_bf16_compute_keeps_fp32_params(name):
    model = create_model(name, dtype=jnp.bfloat16)
    size = _size(name)
    variables = _abstract_init(model, size)
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == jnp.float32
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.dtype == jnp.bfloat16


# Un-jitted, every op compiles on its own for each distinct shape, and each DenseNet layer has its
# own channel count: densenet161/169/201 take ~1 min each that way on 2 cores. They are
# densenet121's code with more layers (densenet121 and densenet_bc_100 run un-jitted), so they run
# jitted only, which keeps the suite well under 15 minutes.
JIT_ONLY = ("densenet161", "densenet169", "densenet201")


class TestForward(chex.TestCase):
    """Real forward passes of every model at small sizes, jitted and (but JIT_ONLY) not."""

    @chex.variants(with_jit=True)
    @parameterized.parameters(*ALL_MODELS)
    def test_eval_and_train(self, name):
        self._check(name)

    @chex.variants(without_jit=True)
    @parameterized.parameters(*[n for n in ALL_MODELS if n not in JIT_ONLY])
    def test_eval_and_train_eager(self, name):
        self._check(name)

    def _check(self, name):
        model = create_model(name, num_classes=5)
        size = _size(name)
        x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
        variables = fast_init(model, x)
        stats = variables.get("batch_stats", {})

        @self.variant
        def forward(variables, x, seed):  # both modes in one program: one compilation per model
            # mutable in eval mode too: a model that wrote batch_stats there would show it.
            return (model.apply(variables, x, train=False, mutable=["batch_stats"]),
                    model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(seed)}))

        (logits, eval_updates), (out, updates) = forward(variables, x, 2)
        chex.assert_shape(logits, (2, 5))
        chex.assert_tree_all_finite(logits)
        # Eval mode reads batch statistics without changing them.
        chex.assert_trees_all_equal(eval_updates.get("batch_stats", {}), stats)

        main, aux = split_logits(out)
        chex.assert_shape([main, *aux], (2, 5))
        chex.assert_tree_all_finite(main)
        if stats:
            changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), stats,
                                             updates["batch_stats"])
            assert all(jax.tree_util.tree_leaves(changed)), f"{name}: batch_stats not all updated"
        differs = not np.allclose(main, split_logits(forward(variables, x, 3)[1][0])[0])
        assert differs == (model_info(name).family in HAS_DROPOUT), (
            f"{name}: a new dropout rng {'changed' if differs else 'did not change'} the output")
