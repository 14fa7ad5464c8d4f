"""Optimizers, schedules, weight-decay masks and the training configs."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import configs, optim
from cnn_jax.configs.common import base_config

PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))},
          "bn": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
          "fc": {"kernel": jnp.ones((4, 10)), "bias": jnp.ones((10,))}}


def _zeros_like(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def test_warmup_cosine_schedule():
    s = optim.create_schedule("cosine", 0.4, total_steps=100, warmup_steps=10)
    np.testing.assert_allclose([s(0), s(5), s(10), s(55), s(100)], [0.0, 0.2, 0.4, 0.2, 0.0],
                               atol=1e-6)


def test_step_schedule_with_warmup():
    s = optim.create_schedule("step", 1.0, total_steps=100, warmup_steps=5,
                              boundaries=[30, 60], decay_factor=0.1)
    np.testing.assert_allclose([s(0), s(5), s(29), s(30), s(59), s(60), s(99)],
                               [0.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_warmup_longer_than_training():
    s = optim.create_schedule("cosine", 1.0, total_steps=4, warmup_steps=16)
    assert float(s(3)) == pytest.approx(1.0) and float(s(4)) == pytest.approx(0.0)
    assert float(optim.create_schedule("cosine", 1.0, total_steps=1, warmup_steps=5)(0)) == 1.0


def test_step_schedule_without_warmup_and_constant():
    s = optim.create_schedule("step", 0.1, total_steps=10, boundaries=[4])
    np.testing.assert_allclose([s(3), s(4)], [0.1, 0.01], rtol=1e-6)
    c = optim.create_schedule("constant", 0.3, total_steps=10)
    np.testing.assert_allclose([c(0), c(9)], [0.3, 0.3])


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        optim.create_schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        optim.create_optimizer("rmsprop", 0.1)
    with pytest.raises(ValueError, match="must be positive"):
        optim.create_schedule("cosine", 0.1, 0)


def test_decay_mask_skips_bn_and_bias():
    mask = optim.decay_mask(PARAMS, skip_bn_and_bias=True)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                    "fc": {"kernel": True, "bias": False}}
    assert all(jax.tree_util.tree_leaves(optim.decay_mask(PARAMS, skip_bn_and_bias=False)))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("skip", [True, False])
def test_weight_decay_mask_applies(name, skip):
    """With zero gradients only weight decay moves parameters: kernels always, 1-D iff not skip."""
    tx = optim.create_optimizer(name, 0.1, weight_decay=0.5, skip_bn_and_bias=skip,
                                lars_trust_coefficient=1.0)
    state = tx.init(PARAMS)
    updates, _ = tx.update(_zeros_like(PARAMS), state, PARAMS)
    moved = jax.tree_util.tree_map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert moved["conv"]["kernel"] and moved["fc"]["kernel"]
    assert moved["bn"]["scale"] == (not skip) and moved["fc"]["bias"] == (not skip)


def test_sgd_is_torch_sgd():
    """torch.optim.SGD: buf = m * buf + (g + wd * p); p -= lr * buf (nesterov: g' + m * buf)."""
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    for name, nesterov in (("sgd", False), ("nesterov", True)):
        tx = optim.create_optimizer(name, 0.1, momentum=0.9, weight_decay=0.01)
        state = tx.init(p)
        params, buf = p, np.zeros(2)
        for _ in range(3):
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        ref, buf = np.array([1.0, -2.0]), np.zeros(2)
        for _ in range(3):
            d = np.array([0.5, 0.25]) + 0.01 * ref
            buf = 0.9 * buf + d
            ref = ref - 0.1 * (d + 0.9 * buf if nesterov else buf)
        np.testing.assert_allclose(params["w"], ref, rtol=1e-5)


def test_adamw_first_step():
    tx = optim.create_optimizer("adamw", 0.1, weight_decay=0.0)
    p = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([3.0, -0.2])}, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], [-0.1, 0.1], rtol=1e-4)  # Adam's first step is lr*sign


def test_gradient_clipping():
    tx = optim.create_optimizer("sgd", 1.0, momentum=0.0, grad_clip_norm=1.0)
    g = {"w": jnp.array([30.0, 40.0])}
    updates, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)


def test_lars_trust_ratio():
    """LARS scales each layer's update by trust_coefficient * ||w|| / ||g||."""
    tx = optim.create_optimizer("lars", 1.0, momentum=0.0, lars_trust_coefficient=0.1)
    p = {"w": jnp.array([3.0, 4.0])}  # norm 5
    g = {"w": jnp.array([0.0, 2.0])}  # norm 2
    updates, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], [0.0, -0.1 * 5 / 2 * 2.0], rtol=1e-5)


def test_linear_scaling_and_step_counts():
    c = base_config()
    c.learning_rate, c.lr_reference_batch_size = 0.1, 256
    assert optim.peak_learning_rate(c, 1024) == pytest.approx(0.4)
    c.lr_reference_batch_size = 0
    assert optim.peak_learning_rate(c, 1024) == pytest.approx(0.1)
    c.num_epochs, c.num_train_steps = 2.5, -1
    assert optim.steps_per_epoch(1000, 64) == 15
    assert optim.total_train_steps(c, 1000, 64) == 38
    c.num_train_steps = 7
    assert optim.total_train_steps(c, 1000, 64) == 7


def test_from_config_builds_a_working_optimizer():
    c = base_config()
    c.lr_schedule, c.warmup_epochs, c.lr_step_epochs = "step", 1.0, (2.0,)
    tx, schedule = optim.from_config(c, steps_per_epoch=10, total_steps=30, global_batch_size=256)
    assert schedule(10) == pytest.approx(0.1) and schedule(20) == pytest.approx(0.01)
    updates, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree_util.tree_leaves(updates))


# ----------------------------------------------------------------------------- configs

CONFIG_FILES = sorted(glob.glob(os.path.join(configs.CONFIG_DIR, "*.py")))
RECIPES = [p for p in CONFIG_FILES if os.path.basename(p) not in ("__init__.py", "common.py")]


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_config_files_share_the_schema(path):
    base = set(base_config().keys())
    for arch in ("", "resnet18", "alexnet", "vgg16", "googlenet", "densenet121"):
        c = configs.load(path, arch)
        assert set(c.keys()) == base
        assert c.image_size > 0 and c.batch_size > 0


def test_recipes():
    def recipe(arch):
        return configs.load(configs.recipe_path(arch, "imagenet2012"), arch)

    for arch in ("alexnet", "vgg16_bn"):
        c = recipe(arch)
        assert (c.optimizer, c.learning_rate, c.momentum, c.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
        assert c.lr_reference_batch_size == 0
    for arch in ("resnet50", "densenet121"):
        c = recipe(arch)
        assert (c.learning_rate, c.lr_reference_batch_size, c.weight_decay, c.num_epochs) == (
            0.1, 256, 1e-4, 90.0)
        assert c.lr_schedule == "step" and tuple(c.lr_step_epochs) == (30.0, 60.0)
    assert recipe("googlenet").aux_loss_weight == 0.3
    assert recipe("googlenet").lr_step_factor == 0.96
    assert recipe("resnet18").augment == "inception" and recipe("vgg11").augment == "vgg"


def test_recipe_paths_and_families():
    assert configs.family("plain20") == "resnet" and configs.family("densenet_bc_100") == "densenet"
    assert os.path.basename(configs.recipe_path("resnet50", "imagenet2012")) == "imagenet_resnet.py"
    assert configs.recipe_path("resnet50", "shapes") == configs.DEFAULT_CONFIG
    assert configs.recipe_path("resnet50", "cifar10") == configs.DEFAULT_CONFIG


def test_default_config_per_arch():
    assert configs.load(configs.DEFAULT_CONFIG, "resnet18").dataset == "shapes"
    assert configs.load(configs.DEFAULT_CONFIG, "alexnet").image_size == 64
    assert (configs.load(configs.DEFAULT_CONFIG, "googlenet_paper").learning_rate
            < configs.load(configs.DEFAULT_CONFIG, "resnet18").learning_rate)
    # VGG's 25,088-input fc6 dies under AdamW's per-weight steps (default.py): the paper's SGD.
    for arch in ("vgg11", "vgg16_bn", "vgg11_lrn"):
        config = configs.load(configs.DEFAULT_CONFIG, arch)
        assert (config.optimizer, config.learning_rate, config.momentum) == ("sgd", 1e-2, 0.9)
    assert configs.load(configs.DEFAULT_CONFIG, "alexnet").optimizer == "adamw"


def test_parse_model_kwargs():
    assert configs.parse_model_kwargs("") == {}
    assert configs.parse_model_kwargs("stage_sizes=(1, 1), widths=(4, 8), skip=False") == {
        "stage_sizes": (1, 1), "widths": (4, 8), "skip": False}
    with pytest.raises(ValueError, match="bad model_kwargs"):
        configs.parse_model_kwargs("widths=foo")
