"""DenseNet (Huang et al. 2017): parameter counts, channel growth, CIFAR DenseNet-BC, remat."""

import contextlib
import io
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from cnn_jax.models import count_params, create_model
from cnn_jax.models.densenet import DENSENET_CONFIGS, DenseBlock, DenseNet, densenet_bc_cifar

from _variables import abstract_variables, fast_init

NUM_CLASSES = 10


def fake_variables(model, size):
    """Variables with the exact tree of ``model.init(..., train=False)``, drawn by numpy."""
    return fast_init(model, jnp.zeros((1, size, size, 3)))


def images(size, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


# torchvision's parameter counts of densenet121/161/169/201 are checked with the registry's other
# torchvision counts (test_models.py).


def test_densenet_bc_100_is_the_papers_cifar_network():
    model = create_model("densenet_bc_100")
    assert model.num_classes == 10 and model.stem == "cifar"
    assert model.block_config == (16, 16, 16) and model.growth_rate == 12
    assert model.num_init_features == 24 and model.compression == 0.5
    params = abstract_variables(model, 32)["params"]
    n = count_params(params)
    assert n == 769_162
    assert 750_000 <= n <= 850_000  # "0.8M" in Huang et al. 2017, Table 2
    chex.assert_shape(params["features_conv0"]["kernel"], (3, 3, 3, 24))
    assert "features_norm0" not in params  # a single conv stem, no BN / max pool before block 1
    # 24 + 16k -> 108, 108 + 16k -> 150, 150 + 16k = 342 features into the classifier.
    chex.assert_shape(params["classifier"]["kernel"], (342, 10))


def test_parameter_names_mirror_torchvision():
    variables = abstract_variables(create_model("densenet121"), 224)
    params, stats = variables["params"], variables["batch_stats"]
    # features.denseblock1.denselayer1.conv1.weight: [128, 64, 1, 1] in torch (OIHW)
    chex.assert_shape(params["features_denseblock1"]["denselayer1"]["conv1"]["kernel"],
                      (1, 1, 64, 128))
    chex.assert_shape(params["features_denseblock1"]["denselayer6"]["conv2"]["kernel"],
                      (3, 3, 128, 32))
    chex.assert_shape(params["features_transition3"]["conv"]["kernel"], (1, 1, 1024, 512))
    chex.assert_shape(stats["features_denseblock4"]["denselayer16"]["norm2"]["mean"], (128,))
    chex.assert_shape(params["features_conv0"]["kernel"], (7, 7, 3, 64))
    chex.assert_shape(params["features_norm5"]["scale"], (1024,))
    chex.assert_shape(params["classifier"]["kernel"], (1024, 1000))
    assert set(params) == {"features_conv0", "features_norm0", "features_norm5", "classifier",
                           *(f"features_denseblock{i}" for i in range(1, 5)),
                           *(f"features_transition{i}" for i in range(1, 4))}


def _intermediate_shapes(model, size):
    x = jnp.zeros((1, size, size, 3))
    variables = abstract_variables(model, size)
    _, state = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=True,
                                                    mutable=["intermediates"]), variables)
    return jax.tree_util.tree_map(lambda a: a.shape, state["intermediates"])


@pytest.mark.parametrize("compression", [0.5, 0.75])
def test_channels_grow_by_k_per_layer_and_shrink_in_transitions(compression):
    growth, blocks, init = DENSENET_CONFIGS["densenet121"]
    shapes = _intermediate_shapes(create_model("densenet121", compression=compression), 224)
    channels, spatial = init, 56  # after the 7x7/2 conv and the 3x3/2 max pool
    for i, num_layers in enumerate(blocks, start=1):
        block = shapes[f"features_denseblock{i}"]
        for j in range(1, num_layers + 1):  # each layer adds exactly k feature maps
            # (new feature maps, normalized inputs): nothing is normalized in evaluation
            assert block[f"denselayer{j}"]["__call__"][0] == ((1, spatial, spatial, growth), ())
        channels += num_layers * growth
        pieces, _ = block["__call__"][0]  # the block's output: its input and every layer's maps
        assert sum(p[-1] for p in pieces) == channels
        assert {p[:3] for p in pieces} == {(1, spatial, spatial)}
        if i < len(blocks):
            channels, spatial = math.floor(channels * compression), spatial // 2
            assert shapes[f"features_transition{i}"]["__call__"][0] == (
                1, spatial, spatial, channels)
    if compression == 0.5:  # torchvision's DenseNet-121 widths
        assert [sum(p[-1] for p in shapes[f"features_denseblock{i}"]["__call__"][0][0])
                for i in range(1, 5)] == [256, 512, 1024, 1024]


def dropout_key(seed=1):
    # "rbg" bits compile several times faster than threefry on CPU; any key type works here.
    return jax.random.key(seed, impl="rbg")


def tiny_bc(**kwargs):
    """DenseNet-BC of depth 16 (3 blocks of 2 layers): the CIFAR code path, cheap to compile."""
    return densenet_bc_cifar(depth=16, growth_rate=6, drop_rate=0.2, **kwargs)


class DenseNetVariantsTest(chex.TestCase):
    """Dropout, batch norm and remat of the dense layers under jit and eagerly.

    The registered networks (densenet121 ... densenet_bc_100) run forward at 32x32 in eval and
    train mode, with and without jit, in the registry-wide tests/test_models.py.
    """

    @chex.variants(with_jit=True, without_jit=True)
    def test_eval_and_train(self):
        model = tiny_bc(memory_efficient=True)
        variables = fake_variables(model, 32)

        @self.variant
        def forward(v, x, key1, key2):
            def train(key):
                return model.apply(v, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": key})
            return model.apply(v, x, train=False), train(key1), train(key2)[0]

        eval_out, (train_out, updates), train_out2 = forward(
            variables, images(32), dropout_key(1), dropout_key(2))
        chex.assert_shape([eval_out, train_out], (2, NUM_CLASSES))
        chex.assert_tree_all_finite((eval_out, train_out))
        assert not np.allclose(eval_out, train_out)  # batch statistics and dropout in train mode
        assert not np.allclose(train_out, train_out2)  # drop_rate=0.2 after every 3x3 conv
        chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
        assert not np.allclose(updates["batch_stats"]["features_norm5"]["mean"], 0.0)


def _loss_and_grads(model, variables, x, key):
    def loss(params):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                   train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return jnp.sum(jnp.sin(out)), (out, updates)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_memory_efficient_gives_same_outputs_grads_and_batch_stats():
    small = dict(stem="cifar", growth_rate=4, block_config=(3,), num_init_features=8,
                 drop_rate=0.2, num_classes=NUM_CLASSES)
    plain, remat = DenseNet(**small), DenseNet(**small, memory_efficient=True)
    variables = fake_variables(plain, 16)
    # Same variables tree: checkpoints move freely between the two settings.
    chex.assert_trees_all_equal_shapes(variables, abstract_variables(remat, 16))
    x, key = images(16), dropout_key(2)
    (loss_a, (out_a, upd_a)), grads_a = _loss_and_grads(plain, variables, x, key)
    (loss_b, (out_b, upd_b)), grads_b = _loss_and_grads(remat, variables, x, key)
    chex.assert_trees_all_close((out_a, upd_a), (out_b, upd_b), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads_a, grads_b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(upd_a["batch_stats"]["features_denseblock1"]["denselayer2"]["norm1"]
                           ["mean"], 0.0)  # batch_stats are updated inside the remat region


def _saved_activation_channels(block, x):
    """Channel counts of the activations ``jax.grad`` keeps for the backward pass of ``block``."""
    variables = fast_init(block, x)

    def loss(params):
        (pieces, _), _ = block.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.concatenate(pieces, axis=-1))

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(loss, variables["params"])
    # Lines read like "f32[2,8,8,28] output of ..."; keep batch-sized 4-D activations.
    shapes = [tuple(map(int, m.group(1).split(","))) for m in
              re.finditer(r"\[([\d,]+)\] output of", buf.getvalue())]
    return {s[-1] for s in shapes if len(s) == 4 and s[0] == x.shape[0]}


def test_memory_efficient_rematerializes_the_concatenations():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 10))
    k, num_layers, bn_size = 6, 3, 4
    concat_widths = {10 + k * i for i in range(1, num_layers)}  # inputs of layers 2..
    plain = _saved_activation_channels(DenseBlock(num_layers, k, bn_size), x)
    remat = _saved_activation_channels(DenseBlock(num_layers, k, bn_size, memory_efficient=True), x)
    # Without remat the backward pass keeps every concatenation (and its BN / ReLU outputs) ...
    assert concat_widths <= plain
    # ... with remat only the block input, the k-channel layer outputs and the bottleneck remain.
    assert remat.isdisjoint(concat_widths)
    assert remat <= {10, k, bn_size * k}


def test_initializers_follow_torchvision():
    """Kaiming-normal (fan_in) convs, torch's default U(+-1/sqrt(fan_in)) linear, zero biases."""
    model = DenseNet(num_classes=100, stem="cifar", growth_rate=32, block_config=(2,),
                     num_init_features=64)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        jnp.zeros((1, 4, 4, 3)))["params"]
    conv2 = params["features_denseblock1"]["denselayer2"]["conv2"]["kernel"]  # 3x3x128x32
    np.testing.assert_allclose(np.std(conv2), math.sqrt(2.0 / (9 * 128)), rtol=0.05)
    fc = params["classifier"]["kernel"]  # 128 x 100
    assert np.max(np.abs(fc)) <= 1 / math.sqrt(128)
    np.testing.assert_allclose(np.std(fc), 1 / math.sqrt(3 * 128), rtol=0.05)
    np.testing.assert_array_equal(params["classifier"]["bias"], 0.0)
    np.testing.assert_array_equal(params["features_norm5"]["scale"], 1.0)


def test_densenet_bc_cifar_helper():
    model = densenet_bc_cifar(190, 40)  # the paper's best CIFAR network, DenseNet-BC (L=190, k=40)
    assert model.block_config == (31, 31, 31) and model.num_init_features == 80
    with pytest.raises(ValueError, match="6n \\+ 4"):
        densenet_bc_cifar(depth=101)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="stem"):
        abstract_variables(DenseNet(stem="tiny"), 32)
    with pytest.raises(ValueError, match="compression"):
        abstract_variables(DenseNet(compression=0.0), 32)
