"""GoogLeNet (Szegedy et al. 2015): parameter counts, aux heads, paper layout, input transform."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.models import count_params, create_model
from cnn_jax.models.googlenet import (INCEPTION_WIDTHS, MIN_INPUT_SIZE, PAPER_AUX_MIN_INPUT_SIZE,
                                      GoogLeNetOutputs)

from _variables import abstract_variables, fast_init

NUM_CLASSES = 10


def abstract_train_apply(model, variables, size):
    x = jnp.zeros((2, size, size, 3))
    return jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(1)}), variables)


def fake_variables(model, size):
    """Variables with the exact tree of ``model.init(..., train=False)``, drawn by numpy."""
    return fast_init(model, jnp.zeros((1, size, size, 3)))


@functools.lru_cache(maxsize=None)
def shared_variables():
    """One variables tree (made in eval mode) for the aux-head model; shared by several tests."""
    return fake_variables(create_model("googlenet", num_classes=NUM_CLASSES, aux_logits=True), 64)


def dropout_key(seed=1):
    # "rbg" bits compile several times faster than threefry on CPU; any key type works here.
    return jax.random.key(seed, impl="rbg")


def images(size, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@pytest.mark.parametrize("name, aux, expected", [
    ("googlenet", False, 6_624_904),
    ("googlenet", True, 13_004_888),
])
def test_param_counts_match_torchvision(name, aux, expected):
    variables = abstract_variables(create_model(name, aux_logits=aux))
    assert count_params(variables["params"]) == expected
    assert ("aux1" in variables["params"]) == aux


def _paper_param_count(num_classes: int, aux: bool) -> int:
    """Count of the paper layout from Table 1 alone: conv weights + biases, no batch norm."""
    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    total = conv(7, 3, 64) + conv(1, 64, 64) + conv(3, 64, 192)
    cin = 192
    for c1, c3r, c3, c5r, c5, pp in INCEPTION_WIDTHS.values():
        total += (conv(1, cin, c1) + conv(1, cin, c3r) + conv(3, c3r, c3) + conv(1, cin, c5r)
                  + conv(5, c5r, c5) + conv(1, cin, pp))
        cin = c1 + c3 + c5 + pp
    total += cin * num_classes + num_classes
    if aux:  # after 4a (512 channels) and 4d (528): 1x1 conv 128, fc 4*4*128 -> 1024, fc
        for c in (512, 528):
            total += conv(1, c, 128) + 2048 * 1024 + 1024 + 1024 * num_classes + num_classes
    return total


@pytest.mark.parametrize("aux, expected", [(False, 6_998_552), (True, 13_378_280)])
def test_paper_layout_param_count(aux, expected):
    variables = abstract_variables(create_model("googlenet_paper", aux_logits=aux))
    assert count_params(variables["params"]) == expected == _paper_param_count(1000, aux)
    assert "batch_stats" not in variables  # no batch norm anywhere in the paper's network


def test_parameter_names_mirror_torchvision():
    tv = abstract_variables(create_model("googlenet", aux_logits=True))
    params, stats = tv["params"], tv["batch_stats"]
    # torchvision: inception3a.branch2.0.conv.weight, inception3a.branch4.1.bn.running_mean, ...
    chex.assert_shape(params["inception3a"]["branch2_0"]["conv"]["kernel"], (1, 1, 192, 96))
    chex.assert_shape(stats["inception3a"]["branch4_1"]["bn"]["mean"], (32,))
    chex.assert_shape(params["conv1"]["conv"]["kernel"], (7, 7, 3, 64))
    chex.assert_shape(params["aux1"]["conv"]["conv"]["kernel"], (1, 1, 512, 128))
    chex.assert_shape(params["aux2"]["conv"]["conv"]["kernel"], (1, 1, 528, 128))
    chex.assert_shape(params["aux1"]["fc1"]["kernel"], (2048, 1024))
    chex.assert_shape(params["fc"]["kernel"], (1024, 1000))
    assert "bias" not in params["conv1"]["conv"]  # BN follows every conv


def test_third_branch_is_3x3_in_torchvision_and_5x5_in_paper():
    tv = abstract_variables(create_model("googlenet"))["params"]
    paper = abstract_variables(create_model("googlenet_paper"))["params"]
    for name, (_, _, _, c5r, c5, _) in INCEPTION_WIDTHS.items():
        block = f"inception{name}"
        chex.assert_shape(tv[block]["branch3_1"]["conv"]["kernel"], (3, 3, c5r, c5))
        chex.assert_shape(paper[block]["branch3_1"]["conv"]["kernel"], (5, 5, c5r, c5))
        chex.assert_shape(paper[block]["branch3_1"]["conv"]["bias"], (c5,))
        assert "bn" not in paper[block]["branch3_1"]


# Output size of each stage at 224x224 (Szegedy et al. 2015, Table 1).
TABLE1_OUTPUTS = {
    "conv1": (112, 64), "conv3": (56, 192),
    "inception3a": (28, 256), "inception3b": (28, 480),
    "inception4a": (14, 512), "inception4b": (14, 512), "inception4c": (14, 512),
    "inception4d": (14, 528), "inception4e": (14, 832),
    "inception5a": (7, 832), "inception5b": (7, 1024),
}


@pytest.mark.parametrize("name", ["googlenet", "googlenet_paper"])
def test_feature_maps_follow_table1(name):
    model = create_model(name)
    _, state = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, 224, 224, 3)), capture_intermediates=True))
    inter = state["intermediates"]
    for stage, (size, channels) in TABLE1_OUTPUTS.items():
        assert inter[stage]["__call__"][0].shape == (1, size, size, channels), stage
    if name == "googlenet_paper":  # LRN after the first pool and after conv3 (Fig. 3)
        assert inter["lrn1"]["__call__"][0].shape == (1, 56, 56, 64)
        assert inter["lrn2"]["__call__"][0].shape == (1, 56, 56, 192)
    else:
        assert "lrn1" not in inter


def test_aux_outputs_only_in_train_mode_with_aux_logits():
    for aux in (False, True):
        model = create_model("googlenet", num_classes=NUM_CLASSES, aux_logits=aux)
        variables = abstract_variables(model, 64)
        out, _ = abstract_train_apply(model, variables, 64)
        assert isinstance(out, GoogLeNetOutputs) == aux
        x = jnp.zeros((2, 64, 64, 3))
        out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
        assert not isinstance(out, tuple)
        chex.assert_shape(out, (2, NUM_CLASSES))


@pytest.mark.parametrize("name, aux, min_size", [
    ("googlenet", True, MIN_INPUT_SIZE["torchvision"]),
    ("googlenet_paper", False, MIN_INPUT_SIZE["paper"]),
    ("googlenet_paper", True, PAPER_AUX_MIN_INPUT_SIZE),
])
def test_minimum_input_size(name, aux, min_size):
    model = create_model(name, num_classes=NUM_CLASSES, aux_logits=aux)
    variables = abstract_variables(model, min_size)
    out, _ = abstract_train_apply(model, variables, min_size)
    chex.assert_shape(list(out) if aux else out, (2, NUM_CLASSES))
    # Every feature map is non-empty at the minimum (a 0x0 map would average to NaN).
    _, state = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, min_size, min_size, 3)), capture_intermediates=True))
    assert min(state["intermediates"]["inception5b"]["__call__"][0].shape[1:3]) >= 1
    with pytest.raises(ValueError, match="at least"):
        abstract_variables(model, min_size - 1)


def test_paper_layout_trains_with_aux_heads():
    model = create_model("googlenet_paper", num_classes=NUM_CLASSES, aux_logits=True)
    size = 80  # the paper's 5x5/3 aux pool needs >= 5x5 at 4a
    variables = fake_variables(model, size)
    assert set(variables) == {"params"}
    assert "lrn1" not in variables["params"]  # LRN has no parameters

    @jax.jit
    def run(v, x):
        train_out = model.apply(v, x, train=True, rngs={"dropout": dropout_key()})
        return train_out, model.apply(v, x, train=False)

    train_out, eval_out = run(variables, images(size))
    assert isinstance(train_out, GoogLeNetOutputs)
    chex.assert_shape(list(train_out) + [eval_out], (2, NUM_CLASSES))
    chex.assert_tree_all_finite((train_out, eval_out))
    assert not np.allclose(train_out.logits, eval_out)  # dropout 0.4 is on in train mode only


def test_transform_input_matches_torchvision_scaling():
    """ImageNet-normalized input with transform_input equals (img - 0.5) / 0.5 without it."""
    variables = shared_variables()
    img = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3))
    mean, std = jnp.array([0.485, 0.456, 0.406]), jnp.array([0.229, 0.224, 0.225])
    with_transform, without = (create_model("googlenet", num_classes=NUM_CLASSES, aux_logits=True,
                                            transform_input=t) for t in (True, False))

    @jax.jit  # both in one program: one compilation (un-jitted, every op compiles: ~20 s)
    def run(v, img):
        return (with_transform.apply(v, (img - mean) / std, train=False),
                without.apply(v, (img - 0.5) / 0.5, train=False))

    outs = run(variables, img)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_unknown_layout_raises():
    with pytest.raises(ValueError, match="layout"):
        abstract_variables(create_model("googlenet", layout="caffe"), 64)
