"""ResNet family (He et al. 2016a/b): parameter counts, forward passes and every option."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.models import count_params, create_model, list_models, model_info
from cnn_jax.models import resnet
from _variables import abstract_variables, fast_init, normal

# torchvision's counts (the test of each is test_models.py's, with the registry's other
# torchvision counts; resnet18's is the base of the norm-placement counts here).
IMAGENET_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# Shortcut 'A' (the paper's CIFAR choice) has no parameters, so resnetN and plainN agree.
CIFAR_COUNTS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def _paths(tree):
    return ["/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _blocks(params):
    return {k: v for k, v in params.items() if k.startswith("layer")}


def _init(model, x):
    """The model's own initializers (only for small nets: see _variables.fast_init)."""
    return model.init(jax.random.key(0), x, train=False)


def _tiny(**kwargs):
    """Two stages, one block each: small enough to run every option eagerly."""
    return resnet.ResNet(**{"num_classes": 5, "stage_sizes": (1, 1), "widths": (8, 16),
                            "stem": "cifar", **kwargs})


def _images(n=2, size=8, channels=3, seed=1):
    return normal(seed, (n, size, size, channels))


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("depth", sorted(CIFAR_COUNTS))
def test_cifar_param_counts(depth):
    for name in (f"resnet{depth}", f"plain{depth}"):
        model = create_model(name)
        assert model.num_classes == 10 and model.shortcut == "A"
        assert count_params(abstract_variables(model, 32)["params"]) == CIFAR_COUNTS[depth]
    # The paper: 6n+2 weighted layers, ~0.27M params for ResNet-20, ~1.7M for ResNet-110.
    n = resnet.CIFAR_BLOCKS[depth]
    assert 6 * n + 2 == depth


def test_cifar_counts_match_paper():
    assert round(CIFAR_COUNTS[20] / 1e6, 2) == 0.27
    assert round(CIFAR_COUNTS[110] / 1e6, 1) == 1.7
    # Projections where the shape changes (16->32, 32->64): 1x1 conv + BN each.
    b = count_params(abstract_variables(create_model("resnet20", shortcut="B"), 32)["params"])
    assert b == 272_474 == CIFAR_COUNTS[20] + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_registered_names():
    assert list_models("resnet*") == sorted(
        list(IMAGENET_COUNTS) + [f"resnet{d}" for d in CIFAR_COUNTS])
    # (family: experiments/activations.py registers its own plain_act when imported)
    assert [n for n in list_models("plain*") if model_info(n).family == "resnet"] == sorted(
        f"plain{d}" for d in CIFAR_COUNTS)
    assert create_model("plain20").skip is False
    assert create_model("plain20", skip=True).skip is True  # overrides win over the table


def test_norm_placement_param_differences_resnet18():
    post = abstract_variables(create_model("resnet18"))["params"]
    bn_channels = sum(v.shape[0] for p, v in zip(_paths(post), jax.tree_util.tree_leaves(post))
                      if p.endswith("/scale"))
    crb = abstract_variables(create_model("resnet18", norm_placement="conv_relu_bn"))["params"]
    assert jax.tree.map(lambda a: a.shape, crb) == jax.tree.map(lambda a: a.shape, post)

    # 'none': each BN's scale and bias (2C) become one conv bias (C).
    none = abstract_variables(create_model("resnet18", norm_placement="none"))
    assert "batch_stats" not in none
    assert count_params(none["params"]) == IMAGENET_COUNTS["resnet18"] - bn_channels

    # 'pre': no stem bn1 and no downsample_bn; a final BN over 512 channels; each block's bn1
    # normalizes its input, so the first block of stages 2-4 has half the bn1 channels.
    pre = abstract_variables(create_model("resnet18", norm_placement="pre"))["params"]
    assert "bn1" not in pre and pre["final_bn"]["scale"].shape == (512,)
    assert not any("downsample_bn" in p for p in _paths(pre))
    removed = 2 * 64 + 2 * (128 + 256 + 512) + 2 * (64 + 128 + 256)
    assert count_params(pre) == IMAGENET_COUNTS["resnet18"] - removed + 2 * 512


# ---------------------------------------------------------------- real forward passes


# Real forward passes (eval and train mode, jitted and not) of every ResNet: test_forward_jit.py
# and test_forward_eager.py.


# ---------------------------------------------------------------- options


def _loss_grads(model, variables, x):
    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    return jax.grad(loss)(variables["params"])


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("place", resnet.NORM_PLACEMENTS)
@pytest.mark.parametrize("shortcut", resnet.SHORTCUTS)
def test_every_shortcut_and_norm_placement(shortcut, place, block):
    model = _tiny(shortcut=shortcut, norm_placement=place, block=block)
    x = _images()
    variables = fast_init(model, x)
    params = variables["params"]
    logits = model.apply(variables, x, train=False)
    chex.assert_shape(logits, (2, 5))
    chex.assert_tree_all_finite(logits)

    # Where the shape changes: layer2_0 always (stride 2), layer1_0 for the bottleneck (8 -> 32).
    reshaping = {"layer2_0"} | ({"layer1_0"} if block == "bottleneck" else set())
    projected = {"A": set(), "B": reshaping, "C": {"layer1_0", "layer2_0"}}[shortcut]
    assert {k for k, v in _blocks(params).items() if "downsample_conv" in v} == projected
    with_bn = place in ("post", "conv_relu_bn")
    assert {k for k, v in _blocks(params).items() if "downsample_bn" in v} == (
        projected if with_bn else set())

    convs = [p for p in _paths(params) if "conv" in p.split("/")[-2]]
    assert any(p.endswith("/bias") for p in convs) == (place == "none")
    assert ("batch_stats" in variables) == (place != "none")
    assert ("final_bn" in params) == (place == "pre")
    assert ("bn1" in params) == with_bn

    grads = _loss_grads(model, variables, x)
    chex.assert_tree_all_finite(grads)
    for path, g in zip(_paths(grads), jax.tree_util.tree_leaves(grads)):
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {path}"


def test_shortcut_c_projects_every_imagenet_block():
    params = abstract_variables(create_model("resnet18", shortcut="C"))["params"]
    assert all("downsample_conv" in v and "downsample_bn" in v for v in _blocks(params).values())
    b = abstract_variables(create_model("resnet18"))["params"]
    assert sorted(k for k, v in _blocks(b).items() if "downsample_conv" in v) == [
        "layer2_0", "layer3_0", "layer4_0"]
    a = abstract_variables(create_model("resnet18", shortcut="A"))["params"]
    assert not any("downsample" in p for p in _paths(a))


def _block_cases(block_cls, place, shortcut, strides, in_ch):
    """(x, output, intermediates) in eval and train mode of a zero-init block."""
    # features=4 with 4 or 4 * expansion input channels: few kernel shapes for the real init.
    block = block_cls(features=4, strides=strides, shortcut=shortcut, norm_placement=place,
                      zero_init_residual=True)
    x = _images(2, 6, in_ch, seed=2)
    variables = block.init(jax.random.key(0), x)
    for train in (False, True):
        out, state = block.apply(variables, x, train=train, capture_intermediates=True,
                                 mutable=["batch_stats", "intermediates"])
        yield x, out, state["intermediates"]


@pytest.mark.parametrize("place", resnet.NORM_PLACEMENTS)
@pytest.mark.parametrize("block_cls", [resnet.BasicBlock, resnet.Bottleneck])
def test_zero_init_residual_blocks_start_as_shortcut(block_cls, place):
    out_ch = 4 * block_cls.expansion
    act = (lambda y: y) if place == "pre" else jax.nn.relu

    # Identity shortcut: the block is relu(x) (x itself for pre-activation).
    for x, out, _ in _block_cases(block_cls, place, "B", 1, out_ch):
        np.testing.assert_allclose(out, act(x), atol=1e-6)

    # Option A: subsample, zero-pad the channels (4 -> 16 for the bottleneck). Pre-activation
    # reshapes the pre-activated input BN-ReLU(x).
    for x, out, inter in _block_cases(block_cls, place, "A", 2, 4):
        src = jax.nn.relu(inter["bn1"]["__call__"][0]) if place == "pre" else x
        expected = jnp.pad(src[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (0, out_ch - 4)))
        chex.assert_shape(out, (2, 3, 3, out_ch))
        np.testing.assert_allclose(out, act(expected), atol=1e-6)
        assert np.abs(np.asarray(out)).max() > 0

    # Projection: the block is the (activated) projection alone.
    for x, out, inter in _block_cases(block_cls, place, "B", 2, 4):
        last = "downsample_bn" if place in ("post", "conv_relu_bn") else "downsample_conv"
        (proj,) = inter[last]["__call__"]
        np.testing.assert_allclose(out, act(proj), atol=1e-6)
        assert np.abs(np.asarray(out)).max() > 0


@pytest.mark.parametrize("place", resnet.NORM_PLACEMENTS)
@pytest.mark.parametrize("block, last", [("basic", 2), ("bottleneck", 3)])
def test_zero_init_residual_zeroes_last_scale(block, last, place):
    x = _images()
    params = _init(_tiny(block=block, widths=(4, 4), zero_init_residual=True,
                         norm_placement=place), x)["params"]
    default = _init(_tiny(block=block, widths=(4, 4), norm_placement=place), x)["params"]
    for name, blk in _blocks(params).items():
        if place == "none":  # no BN: the branch's last conv starts at zero instead
            np.testing.assert_array_equal(blk[f"conv{last}"]["kernel"], 0.0, err_msg=name)
            assert np.abs(np.asarray(default[name][f"conv{last}"]["kernel"])).max() > 0
            continue
        for i in range(1, last + 1):
            np.testing.assert_array_equal(blk[f"bn{i}"]["scale"], 0.0 if i == last else 1.0,
                                          err_msg=f"{name}/bn{i}")
        np.testing.assert_array_equal(default[name][f"bn{last}"]["scale"], 1.0)


@pytest.mark.parametrize("train", [False, True])
def test_zero_init_residual_network_is_its_shortcut_path(train):
    # Shortcut A: every block starts as relu(subsample(x)), so the stem's features reach the
    # second stage unchanged but subsampled.
    model = _tiny(widths=(4, 4), shortcut="A", zero_init_residual=True)
    x = _images()
    variables = _init(model, x)
    _, state = model.apply(variables, x, train=train, capture_intermediates=True,
                           mutable=["intermediates", "batch_stats"])
    (stem,) = state["intermediates"]["bn1"]["__call__"]
    (feats,) = state["intermediates"]["layer2_0"]["__call__"]
    np.testing.assert_allclose(feats, jax.nn.relu(stem)[:, ::2, ::2], atol=1e-6)


def test_plain_networks_have_no_shortcut():
    x = _images(2, 32)
    res, plain = create_model("resnet20"), create_model("plain20")
    variables = fast_init(res, x)
    # Same parameters, different function: the plain net adds no shortcut.
    chex.assert_trees_all_equal_shapes(variables, abstract_variables(plain, 32))
    assert not np.allclose(res.apply(variables, x), plain.apply(variables, x))

    # A plain block is relu(branch): zeroing its last BN kills its output entirely.
    block = resnet.BasicBlock(features=4, skip=False)
    xb = _images(2, 4, 4, seed=3)
    vb = fast_init(block, xb)
    assert np.abs(np.asarray(block.apply(vb, xb))).max() > 0
    vb["params"]["bn2"]["scale"] = jnp.zeros(4)
    np.testing.assert_array_equal(block.apply(vb, xb), 0.0)

    # With projection shortcuts requested, a plain net still has none.
    params = abstract_variables(create_model("resnet18", skip=False, shortcut="C"))["params"]
    assert not any("downsample" in p for p in _paths(params))


def test_bf16_option_a_and_pre():
    model = _tiny(dtype=jnp.bfloat16, norm_placement="pre", shortcut="A")
    x = _images()
    variables = fast_init(model, x)
    logits = model.apply(variables, x)
    assert logits.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(logits)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))


@pytest.mark.parametrize("kwargs, match", [
    (dict(shortcut="D"), "shortcut"),
    (dict(norm_placement="bn_relu"), "norm_placement"),
    (dict(block="wide"), "block"),
    (dict(stem="tiny"), "stem"),
    (dict(widths=(64, 128)), "one entry per stage"),
    (dict(skip=False, zero_init_residual=True), "zero_init_residual"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet18", **kwargs)


def test_option_a_cannot_shrink_channels():
    block = resnet.BasicBlock(features=4, shortcut="A")
    with pytest.raises(ValueError, match="cannot reduce"):
        jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
