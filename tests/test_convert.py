"""cnn_jax.convert: torchvision weights give torchvision's logits (issue 6).

Which comparisons run where (the 2-core CI budget): one representative per block type runs the full
logit comparison at 224x224 and at the odd 225x231 (padding, ceil-mode pools and adaptive pools on
odd maps): alexnet, vgg11_bn (plus its fully-convolutional mode), googlenet, resnet18 (basic
blocks), resnet50 (bottlenecks) and densenet121. The other VGG and ResNet depths reuse those layers
and differ only in the tables that name and count them, so they compare logits at the smallest
valid input (32x32), which checks that every layer is named and ordered right. DenseNet-161/169/201
compile slowly (hundreds of distinct concatenation shapes) and ResNet-101 is ResNet-152 with fewer
blocks: they check the converted tree (every key used once, every variable of ``init`` filled with
its shape) and a sample of values.
"""

from __future__ import annotations

import functools
import os
import sys

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from cnn_jax import convert, imagenet_classes
from cnn_jax.models import create_model, model_info

import _torchvision as tv

TOL = 1e-4  # max |logit difference| in float32, on logits of std ~2 (see tv.calibrate)


@pytest.fixture(scope="module", autouse=True)
def _trace_each_model_once():
    """``convert.expected_variables`` (``model.init`` traced by ``eval_shape``, 0.3-3 s) once per
    distinct model: ``from_torch_state_dict``, ``load_converted`` and the tests' own tree checks
    call it ~70 times for ~25 models here. Modules hash and compare by their fields, so a cached
    tree is exactly what the call would return; each caller gets its own copy of the dicts."""
    original, cache = convert.expected_variables, {}

    def _copy_dicts(tree):  # in their order (tree_map would sort the keys)
        return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    def cached(model, image_size: int = 224):
        key = (type(model), model, image_size)
        if key not in cache:
            cache[key] = original(model, image_size)
        return _copy_dicts(cache[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convert, "expected_variables", cached)
        yield


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, h, w, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _reference(name: str, **torch_kwargs):
    """A random torchvision model whose logits on the 224x224 test images have std ~2."""
    torch, _ = tv.import_torchvision()
    model = tv.random_model(name, **torch_kwargs)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    tv.calibrate(model, head, _images(2, 224, 224))
    return model


@functools.lru_cache(maxsize=None)
def _apply_fn(model):
    """One jitted eval apply per distinct model (modules hash by their fields), so that tests of
    the same network at the same input shape reuse its compiled program."""
    return jax.jit(functools.partial(model.apply, train=False))


def _assert_logits_match(apply, variables, torch_model, images):
    ref = tv.torch_logits(torch_model, images)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(apply(variables, images))
    assert out.shape == ref.shape
    assert np.std(ref) > 0.1, "reference logits too small for the tolerance to mean anything"
    diff = float(np.max(np.abs(out - ref)))
    assert diff < TOL, f"max |logit diff| {diff:.2e} (logit std {np.std(ref):.2f})"


def _assert_tree_like_init(variables, model):
    expected = convert.expected_variables(model)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, expected)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))


FULL = {
    "alexnet": ({}, {}),
    "vgg11_bn": ({}, {}),
    # torchvision's published GoogLeNet file has auxiliary heads and wants transform_input.
    "googlenet": (dict(aux_logits=True, transform_input=True, init_weights=True),
                  dict(transform_input=True)),
    "resnet18": ({}, {}),
    "resnet50": ({}, {}),
    "densenet121": ({}, {}),
}


@pytest.mark.parametrize("arch", list(FULL))
def test_logits_match_torchvision(arch):
    torch_kwargs, model_kwargs = FULL[arch]
    torch_model = _reference(arch, **torch_kwargs)
    variables = convert.from_torch_state_dict(arch, torch_model.state_dict(), **model_kwargs)
    model = create_model(arch, **model_kwargs)
    _assert_tree_like_init(variables, model)
    apply = _apply_fn(model)
    _assert_logits_match(apply, variables, torch_model, _images(2, 224, 224))
    _assert_logits_match(apply, variables, torch_model, _images(1, 225, 231, seed=1))
    if model_info(arch).family == "vgg":  # Simonyan & Zisserman's dense-as-conv evaluation, same weights
        dense_as_conv = _apply_fn(create_model(arch, fully_conv=True))
        _assert_logits_match(dense_as_conv, variables, torch_model, _images(2, 224, 224))


SMALL = ["vgg11", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
         "resnet34", "resnet152"]


@pytest.mark.parametrize("arch", SMALL)
def test_logits_match_torchvision_small_input(arch):
    torch, _ = tv.import_torchvision()
    # VGG's 4096-wide head is the same in every depth and tested on vgg11_bn above; here a
    # 64-wide one keeps the test about the convolutional layers (and 100x smaller).
    model_kwargs = {"fc_features": 64} if model_info(arch).family == "vgg" else {}
    torch_model = tv.random_model(arch, vgg_fc_features=model_kwargs.get("fc_features", 0))
    head = [m for m in torch_model.modules() if isinstance(m, torch.nn.Linear)][-1]
    images = _images(1, 32, 32)
    tv.calibrate(torch_model, head, images)
    variables = convert.from_torch_state_dict(arch, torch_model.state_dict(), **model_kwargs)
    model = create_model(arch, **model_kwargs)
    _assert_tree_like_init(variables, model)
    # Un-jitted: with few distinct layer shapes, eager op caching is cheaper than compiling.
    _assert_logits_match(functools.partial(model.apply, train=False), variables, torch_model,
                         images)


def _torch_layout(value: np.ndarray) -> np.ndarray:
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value


# Torch key -> Flax variable, one per kind of layer, from the deepest block of each network.
_SAMPLES = {
    "resnet101": [("layer3.22.conv2.weight", "params/layer3_22/conv2/kernel"),
                  ("layer3.22.bn3.running_var", "batch_stats/layer3_22/bn3/var"),
                  ("layer4.0.downsample.1.weight", "params/layer4_0/downsample_bn/scale"),
                  ("fc.weight", "params/fc/kernel")],
    **{name: [(f"features.denseblock4.denselayer{n}.conv2.weight",
               f"params/features_denseblock4/denselayer{n}/conv2/kernel"),
              (f"features.denseblock4.denselayer{n}.norm1.running_var",
               f"batch_stats/features_denseblock4/denselayer{n}/norm1/var"),
              ("features.transition2.conv.weight", "params/features_transition2/conv/kernel"),
              ("features.norm5.weight", "params/features_norm5/scale"),
              ("classifier.weight", "params/classifier/kernel")]
       for name, n in (("densenet161", 24), ("densenet169", 32), ("densenet201", 32))},
}


@pytest.mark.parametrize("arch", list(_SAMPLES))
def test_deep_variants_convert(arch):
    """ResNet-101 is ResNet-152 with fewer blocks; DenseNets compile too slowly for CI here."""
    state_dict = {k: v.numpy() for k, v in tv.random_model(arch).state_dict().items()}
    variables = convert.from_torch_state_dict(arch, state_dict)
    _assert_tree_like_init(variables, create_model(arch))
    flat = traverse_util.flatten_dict(variables, sep="/")
    for key, flax_name in _SAMPLES[arch]:
        np.testing.assert_array_equal(_torch_layout(flat[flax_name]), state_dict[key])


def test_densenet_legacy_keys():
    """The published densenet*.pth files still say ``norm.1`` where the modules say ``norm1``."""
    state_dict = _reference("densenet121").state_dict()
    legacy = {}
    for key, value in state_dict.items():
        for old in ("norm1", "norm2", "conv1", "conv2"):
            if ".denselayer" in key and f".{old}." in key:
                key = key.replace(f".{old}.", f".{old[:-1]}.{old[-1]}.")
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    chex.assert_trees_all_equal(convert.from_torch_state_dict("densenet121", legacy),
                                convert.from_torch_state_dict("densenet121", state_dict))


# ----------------------------------------------------------------------------- GoogLeNet heads


def _googlenet_torch():
    return _reference("googlenet", **FULL["googlenet"][0])


def test_googlenet_aux_heads_match_torchvision():
    """The auxiliary heads (with their own C,H,W flatten) convert too, for aux_logits=True."""
    from cnn_jax.models.googlenet import InceptionAux

    torch_model = _googlenet_torch()
    variables = convert.from_torch_state_dict("googlenet", torch_model.state_dict(),
                                              aux_logits=True, transform_input=True)
    _assert_tree_like_init(variables, create_model("googlenet", aux_logits=True))
    without = convert.from_torch_state_dict("googlenet", torch_model.state_dict())
    assert "aux1" not in without["params"] and "aux1" not in without["batch_stats"]
    shared = {c: {k: v for k, v in tree.items() if not k.startswith("aux")}
              for c, tree in variables.items()}
    chex.assert_trees_all_equal(shared, without)

    for name, channels in (("aux1", 512), ("aux2", 528)):  # inputs: 4a's and 4d's outputs
        head = getattr(torch_model, name)
        feature_map = np.random.default_rng(3).standard_normal((2, 14, 14, channels))
        feature_map = feature_map.astype(np.float32)
        tv.calibrate(head, head.fc2, feature_map)
        variables = convert.from_torch_state_dict("googlenet", torch_model.state_dict(),
                                                  aux_logits=True)
        sub = {"params": variables["params"][name], "batch_stats": variables["batch_stats"][name]}
        apply = jax.jit(functools.partial(InceptionAux(1000).apply, train=False))
        _assert_logits_match(apply, sub, head, feature_map)


def test_googlenet_aux_logits_needs_aux_keys():
    state_dict = {k: v for k, v in _googlenet_torch().state_dict().items()
                  if not k.startswith("aux")}
    with pytest.raises(convert.ConversionError, match=r"missing: aux1\.conv\.conv\.weight "
                                                      r"\(128, 512, 1, 1\)"):
        convert.from_torch_state_dict("googlenet", state_dict, aux_logits=True)


# ----------------------------------------------------------------------------- errors


@functools.lru_cache(maxsize=None)
def _resnet18_numpy():
    return {k: v.numpy() for k, v in _reference("resnet18").state_dict().items()}


def _resnet18_state_dict():
    return dict(_resnet18_numpy())


def test_numpy_and_torch_inputs_agree_and_module_prefix_is_stripped():
    torch_sd = _reference("resnet18").state_dict()
    from_numpy = convert.from_torch_state_dict("resnet18", _resnet18_state_dict())
    chex.assert_trees_all_equal(from_numpy, convert.from_torch_state_dict("resnet18", torch_sd))
    wrapped = {f"module.{k}": v for k, v in _resnet18_state_dict().items()}  # nn.DataParallel
    chex.assert_trees_all_equal(from_numpy, convert.from_torch_state_dict("resnet18", wrapped))


def test_missing_key():
    sd = _resnet18_state_dict()
    del sd["layer2.1.bn2.running_var"]
    with pytest.raises(convert.ConversionError,
                       match=r"0 wrong shape, 1 missing, 0 unexpected.*missing: "
                             r"layer2\.1\.bn2\.running_var \(128,\)"):
        convert.from_torch_state_dict("resnet18", sd)


def test_unexpected_key():
    sd = _resnet18_state_dict()
    sd["layer5.0.conv1.weight"] = np.zeros((8, 4, 3, 3), np.float32)
    with pytest.raises(convert.ConversionError,
                       match=r"unexpected: layer5\.0\.conv1\.weight \(8, 4, 3, 3\)"):
        convert.from_torch_state_dict("resnet18", sd)


def test_wrong_shape():
    sd = _resnet18_state_dict()
    sd["layer3.0.conv2.weight"] = sd["layer3.0.conv2.weight"][:, :, :1, :1]
    with pytest.raises(convert.ConversionError,
                       match=r"layer3\.0\.conv2\.weight: the file has \(256, 256, 1, 1\), "
                             r"resnet18 expects \(256, 256, 3, 3\)"):
        convert.from_torch_state_dict("resnet18", sd)


def test_wrong_num_classes():
    with pytest.raises(convert.ConversionError,
                       match=r"fc\.weight: the file has \(1000, 512\), resnet18 expects "
                             r"\(10, 512\)"):
        convert.from_torch_state_dict("resnet18", _resnet18_state_dict(), num_classes=10)


def test_num_classes_is_taken_from_the_file():
    sd = _resnet18_state_dict()
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:10], sd["fc.bias"][:10]
    variables = convert.from_torch_state_dict("resnet18", sd)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)


@pytest.mark.parametrize("arch, match", [
    ("resnet34", r"does not fit 'resnet34' \(0 wrong shape, 80 missing, 0 unexpected\): "
                 r"missing: layer1\.2\.bn1\.bias \(64,\)"),
    ("resnet50", r"wrong shape: layer1\.0\.conv1\.weight: the file has \(64, 64, 3, 3\), "
                 r"resnet50 expects \(64, 64, 1, 1\)"),
    ("vgg11_bn", r"\(0 wrong shape, 54 missing, 102 unexpected\): missing: features\.1\.bias "
                 r"\(64,\) .*; unexpected: conv1\.weight \(64, 3, 7, 7\)"),
])
def test_wrong_architecture(arch, match):
    with pytest.raises(convert.ConversionError, match=match):
        convert.from_torch_state_dict(arch, _resnet18_state_dict())


def test_non_float_array():
    sd = _resnet18_state_dict()
    sd["fc.bias"] = sd["fc.bias"].astype(np.int64)
    with pytest.raises(convert.ConversionError, match=r"fc\.bias: expected a floating-point"):
        convert.from_torch_state_dict("resnet18", sd)


# ----------------------------------------------------------------------------- files, CLI


@pytest.fixture(scope="module")
def converted_resnet18(tmp_path_factory):
    """A resnet18 .pth file and the directory ``python -m cnn_jax.convert`` made of it."""
    torch, _ = tv.import_torchvision()
    root = tmp_path_factory.mktemp("convert")
    pth = str(root / "resnet18-random.pth")
    torch.save(_reference("resnet18").state_dict(), pth)
    out = str(root / "resnet18")
    assert convert.main(["--arch=resnet18", f"--torch_checkpoint={pth}", f"--output={out}"]) == 0
    return pth, out


def test_cli_round_trip(converted_resnet18, capsys):
    pth, out = converted_resnet18
    model, variables, meta = convert.load_converted(out)
    assert (meta["arch"], meta["num_classes"], meta["source"]) == ("resnet18", 1000, "torchvision")
    assert meta["config"]["dataset"] == "imagenet2012"
    _assert_tree_like_init(variables, model)
    # test_logits_match_torchvision[resnet18]'s images: its compiled program is reused.
    _assert_logits_match(_apply_fn(model), variables, _reference("resnet18"), _images(2, 224, 224))
    # A second conversion into the same directory is refused rather than mixed with the first.
    assert convert.main(["--arch=resnet18", f"--torch_checkpoint={pth}", f"--output={out}"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_wrong_arch_is_one_line_error(converted_resnet18, tmp_path, capsys):
    pth, _ = converted_resnet18
    code = convert.main(["--arch=resnet34", f"--torch_checkpoint={pth}",
                         f"--output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: the state_dict does not fit 'resnet34'")
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "checkpoints" / "0")


def test_init_from_converted_reinitializes_only_the_head(converted_resnet18):
    _, out = converted_resnet18
    model = create_model("resnet18", num_classes=10)
    rng = np.random.default_rng(0)
    fresh = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                                   convert.expected_variables(model))
    variables, reinitialized = convert.init_from_converted(out, fresh, arch="resnet18")
    assert sorted(reinitialized) == ["params/fc/bias", "params/fc/kernel"]
    _, pretrained, _ = convert.load_converted(out)
    chex.assert_trees_all_equal(variables["params"]["fc"], fresh["params"]["fc"])
    del pretrained["params"]["fc"], variables["params"]["fc"]
    chex.assert_trees_all_equal(variables, pretrained)
    with pytest.raises(ValueError, match="holds 'resnet18' weights, not 'resnet34'"):
        convert.init_from_converted(out, fresh, arch="resnet34")


def test_save_and_load_without_batch_stats(tmp_path):
    """BN-free nets have no batch_stats; VGG keeps its fc_features option in the meta."""
    torch_model = tv.random_model("vgg11", vgg_fc_features=64)
    variables = convert.from_torch_state_dict("vgg11", torch_model.state_dict(), fc_features=64)
    assert set(variables) == {"params"}
    convert.save_converted(str(tmp_path), "vgg11", variables, {"fc_features": 64})
    model, restored, meta = convert.load_converted(str(tmp_path))
    assert meta["config"]["model"] == {"fc_features": 64} and model.fc_features == 64
    chex.assert_trees_all_equal(restored, variables)


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch, capsys):
    pth = tmp_path / "weights.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    code = convert.main(["--arch=resnet18", f"--torch_checkpoint={pth}",
                         f"--output={tmp_path / 'out'}"])
    assert code == 1
    assert "pip install 'cnn_jax[torch]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict


def test_predict_gives_top5_with_names(converted_resnet18, tmp_path):
    from PIL import Image

    from cnn_jax import predict

    _, out = converted_resnet18
    pixels = np.random.default_rng(5).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    path = str(tmp_path / "noise.jpg")
    Image.fromarray(pixels).save(path, quality=95)
    result = predict.predict(out, [path], arch="resnet18")
    assert result["step"] == 0 and result["results"][0]["image"] == path
    lines = predict.format_text(result).splitlines()
    assert lines[0] == path and len(lines) == 6
    names = imagenet_classes.class_names()
    # The same preprocessed image through torchvision's model gives the same five classes.
    ref = tv.torch_logits(_reference("resnet18"), predict.load_image(path, 224)[None])[0]
    for rank, (line, index) in enumerate(zip(lines[1:], np.argsort(-ref)[:5]), start=1):
        assert line.strip().startswith(f"{rank}.")
        assert line.endswith(f"%  {names[index]}"), line


def test_predict_refuses_another_arch(converted_resnet18):
    from cnn_jax import predict

    _, out = converted_resnet18
    with pytest.raises(ValueError, match="holds a checkpoint of arch='resnet18', not 'resnet50'"):
        predict.predict(out, ["x.jpg"], arch="resnet50")


def test_imagenet_class_names():
    names = imagenet_classes.class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench, Tinca tinca" and imagenet_classes.short_name(999) == "toilet tissue"
    synsets = imagenet_classes.synsets()
    assert synsets[0] == "n01440764" and synsets == tuple(sorted(synsets))


def test_imagenet_class_names_match_torchvision():
    tv.import_torchvision()
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    # Same order; only two spellings differ ('crane bird' / 'crane (bird)', 'maillot tank suit').
    names = imagenet_classes.class_names()
    agree = sum(c.lower() in n.lower() for c, n in zip(_IMAGENET_CATEGORIES, names))
    assert agree == 998
