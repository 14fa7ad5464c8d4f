"""Registry entries (metadata), model options as config.model, and the up-front config checks."""

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _train_helpers as h
from _variables import fast_init
from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import configs, convert, evaluate, input_pipeline, summary, train_lib
from cnn_jax.models import (check_model_options, create_model, list_models, model_info,
                            register_model)
from cnn_jax.models import registry


class TinyNet(nn.Module):
    """A new architecture defined outside the package: conv-BN-ReLU, global pool, dense."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), strides=2, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                         name="bn")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


@pytest.fixture(scope="module")
def tinynet():
    """``tinynet_test`` registered from this module for the tests below, removed afterwards."""
    register_model(family="tinynet", has_batch_norm=True, min_input_size=3,
                   default_input_size=32, classifier=("head",))(tinynet_test)
    yield "tinynet_test"
    registry.unregister_model("tinynet_test")


def tinynet_test(**kwargs) -> TinyNet:
    return TinyNet(**kwargs)


def test_new_architecture_trains_evaluates_and_analyzes(tinynet, tmp_path):
    """Registered in a test module, without touching a project file, the whole toolchain works."""
    assert tinynet in list_models("tinynet*") and model_info(tinynet).family == "tinynet"
    data_dir = str(tmp_path / "data")
    input_pipeline.prepare_dataset(h.TINY_DATASET, data_dir, image_size=32)
    config = configs.load(configs.DEFAULT_CONFIG, tinynet)
    config.arch, config.dataset, config.data_dir = tinynet, h.TINY_DATASET, data_dir
    config.model = configs.model_config({"width": "4"})  # as --config.model.width=4 gives it
    config.batch_size, config.eval_batch_size, config.num_train_steps = 16, 32, 3
    config.progress_bar, config.async_checkpointing = False, False
    workdir = str(tmp_path / "work")
    result = train_lib.train_and_evaluate(config, workdir)
    assert result["step"] == 3 and 0.0 <= result["top1"] <= 1.0

    metrics, step, stored = evaluate.evaluate_checkpoint(workdir, tinynet)
    assert step == 3 and metrics["top1"] == pytest.approx(result["top1"])
    assert stored.model.to_dict() == {"width": 4}  # typed by the module's field, stored
    a = summary.analyze_registered(tinynet)
    assert a.input_shape == (1, 32, 32, 3) and a.totals.params == 3 * 3 * 3 * 8 + 8 + 2 * 8 + 90


def test_entries_are_complete():
    for name in list_models():
        info = model_info(name)
        assert info.name == name and (info.family in name or info.family == "resnet"), name
        assert info.min_input_size <= info.default_input_size
        if info.torchvision:  # torchvision's published numbers, one entry per weight file
            assert info.torchvision.name == name and 50 < info.torchvision.top1 < 80
            assert info.torchvision.top1 < info.torchvision.top5 < 100
    assert model_info("googlenet_paper").has_batch_norm is False
    assert model_info("vgg16_bn").has_batch_norm and not model_info("vgg16").has_batch_norm
    assert model_info("resnet20").default_input_size == 32
    assert model_info("densenet121").classifier == ("classifier",)


@pytest.mark.parametrize("name", ["alexnet", "googlenet_paper", "vgg11"])
def test_min_input_size_is_exact(name):
    """The entry's minimum works and one pixel less does not (no map shrinks to nothing)."""
    model, size = create_model(name), model_info(name).min_input_size

    def shapes(s):
        x = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
        v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
        _, inter = jax.eval_shape(lambda v, x: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]), v, x)
        return [leaf.shape for leaf in jax.tree_util.tree_leaves(inter)]

    assert all(0 not in s for s in shapes(size))
    try:
        assert any(0 in s for s in shapes(size - 1))
    except ValueError:
        pass  # the model's own "too small" error


def test_model_options_are_typed_and_checked():
    assert check_model_options("resnet20", {"shortcut": "C", "widths": "(8, 16, 32)",
                                            "skip": "false", "zero_init_residual": True}) == {
        "shortcut": "C", "widths": (8, 16, 32), "skip": False, "zero_init_residual": True}
    assert check_model_options("alexnet", {"dropout_rate": 1, "widths": [1, 2, 3, 4, 5]}) == {
        "dropout_rate": 1.0, "widths": (1, 2, 3, 4, 5)}
    assert check_model_options("googlenet", {"dropout": None, "aux_logits": "True"}) == {
        "dropout": None, "aux_logits": True}
    with pytest.raises(ValueError, match=r"--config.model.shortcutt is not an option of "
                       r"'resnet20' \(did you mean 'shortcut'\?\); valid options: .*norm_placement"):
        check_model_options("resnet20", {"shortcutt": "C"})
    with pytest.raises(ValueError, match="num_classes is set by the training loop"):
        check_model_options("resnet20", {"num_classes": 3})
    with pytest.raises(ValueError, match=r"growth_rate='x' does not fit the option growth_rate of "
                       r"'densenet121' \(a number, default 32\)"):
        check_model_options("densenet121", {"growth_rate": "x"})


def test_checkpoints_with_model_kwargs_still_load(tmp_path):
    """Checkpoints written before config.model carry a model_kwargs string; both kinds load."""
    legacy = {"arch": "resnet20", "model_kwargs": "widths=(4, 8, 8)"}
    model = train_lib.build_model(ml_collections.ConfigDict(legacy | {"dtype": "float32"}), 10)
    assert model.widths == (4, 8, 8)
    # A converted checkpoint of the old layout: meta['model_kwargs'] and no config.model.
    variables = fast_init(create_model("resnet20", widths=(4, 8, 8)), jnp.zeros((1, 32, 32, 3)))
    meta = convert.converted_meta("resnet20", 10, {})
    del meta["config"]["model"]
    meta["model_kwargs"] = "widths=(4, 8, 8)"
    c = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1, keep_best=False, async_save=False)
    c.save(0, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, meta)
    c.close()
    restored_model, restored, _ = convert.load_converted(str(tmp_path))
    assert restored_model.widths == (4, 8, 8)
    np.testing.assert_array_equal(restored["params"]["fc"]["kernel"],
                                  variables["params"]["fc"]["kernel"])


def _config(**fields):
    c = configs.load(configs.DEFAULT_CONFIG, "resnet20")
    c.arch = "resnet20"
    configs.apply_overrides(c, fields)
    return c


@pytest.mark.parametrize("fields, message", [
    ({"learnin_rate": 0.1}, "unknown config field --config.learnin_rate; did you mean "
                            "--config.learning_rate?"),
    ({"model_kwargs": "shortcut='C'"}, "pass model options as --config.model.FIELD=VALUE"),
    ({"learning_rate": -1.0}, "--config.learning_rate=-1.0 must be positive"),
    ({"learning_rate": 0.0}, "--config.learning_rate=0.0 must be positive"),
    ({"batch_size": 0}, "--config.batch_size=0 must be positive"),
    ({"label_smoothing": 1.5}, "--config.label_smoothing=1.5 must be in [0, 1)"),
    ({"optimizer": "adam"}, "unknown optimizer 'adam' (--config.optimizer); choose one of sgd"),
    ({"dtype": "float64"}, "unknown dtype 'float64' (--config.dtype); choose one of float32, "
                           "bfloat16, float16"),
    ({"lr_step_epochs": (60.0, 30.0)}, "must be increasing epochs"),
    ({"augment": "flipp=true"}, "unknown augmentation option(s) ['flipp']"),
    ({"model.shortcut": "D"}, "shortcut"),
    ({"model.widthz": (8, 16, 32)}, "did you mean 'widths'"),
    ({"arch": "alexnet", "image_size": 32}, "--config.image_size=32 is too small for alexnet"),
    ({"arch": "nope"}, "unknown architecture 'nope'"),
])
def test_config_mistakes_are_one_line_errors(fields, message):
    with pytest.raises(ValueError) as e:
        configs.validate(_config(**fields), check_paths=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_paths_that_are_files_are_refused_before_anything_is_written(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    for kwargs, message in [({"workdir": str(afile)}, f"--workdir={afile} is a file"),
                            ({"workdir": str(afile / "sub")}, "is under the file"),
                            ({"data_dir": str(afile)}, f"--data_dir={afile} is a file"),
                            ({"init_from": str(tmp_path / "none")}, "is not a directory")]:
        c = _config(**{k: v for k, v in kwargs.items() if k != "workdir"})
        with pytest.raises(ValueError, match=message):
            train_lib.train_and_evaluate(c, kwargs.get("workdir", str(tmp_path / "w")))
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing was written


@pytest.mark.parametrize("name, options", [
    ("resnet18", {}), ("googlenet", {}), ("vgg11_bn", {"fc_features": 16}),
    ("densenet_bc_100", {"memory_efficient": True, "block_config": (2, 1, 1)})])
def test_abstract_variables_need_no_initializer_traced(name, options):
    """``abstract_variables`` traces ``init`` under ``layers.shapes_only``: the same tree of shapes
    and dtypes as tracing every initializer, and a real ``init`` afterwards (through ``nn.remat``
    too) still draws its kernels at random."""
    model, size = create_model(name, num_classes=7, **options), 32
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    traced = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)
    shapes = registry.abstract_variables(model, size)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(traced)
    assert jax.tree_util.tree_leaves(shapes) == jax.tree_util.tree_leaves(traced)
    if name == "densenet_bc_100":  # the remat path's kernels are not zeros once outside
        variables = jax.jit(lambda x: model.init(rngs, x, train=False))(jnp.zeros((1, size, size, 3)))
        kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(variables["params"])
                   if p[-1].key == "kernel"]
        assert kernels and all(float(jnp.std(k)) > 0 for k in kernels)
