"""A run on an image folder, then everything one does with it: predict, evaluate (every protocol),
fine-tune from it, and export (StableHLO and SavedModel, reloaded and compared with Flax)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _image_folders as f
import _train_helpers as h
from _variables import fast_init
from cnn_jax import loading, metrics as metrics_lib, train_lib
from cnn_jax.configs import default
from cnn_jax.models import create_model

IMAGE_SIZE = 16
KWARGS = {"stage_sizes": (1, 1, 1), "widths": (4, 8, 8)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """resnet20 (a few thousand parameters) trained 2 steps on a 3-class image folder."""
    base = tmp_path_factory.mktemp("run")
    root = f.make_folder(str(base / "images"), n_train=6, n_val=3)
    config = default.get_config(h.TINY_ARCH)
    config.arch, config.model_kwargs = h.TINY_ARCH, h.TINY_MODEL_KWARGS
    config.dataset, config.data_dir = f"folder:{root}", str(base / "tfds")
    config.image_size, config.batch_size, config.eval_batch_size = IMAGE_SIZE, 6, 4
    config.num_train_steps, config.eval_every_steps, config.progress_bar = 2, 1, False
    workdir = str(base / "work")
    train_lib.train_and_evaluate(config, workdir)
    images = [os.path.join(root, "val", c, n) for c in f.CLASSES
              for n in sorted(os.listdir(os.path.join(root, "val", c)))]
    return workdir, images


def test_checkpoint_records_what_inference_needs(run):
    workdir, _ = run
    loaded = loading.load(workdir, "best")
    assert loaded.class_names == f.CLASSES and loaded.image_size == IMAGE_SIZE
    assert loaded.meta["dataset"].startswith("folder:/") and loaded.step in (1, 2)
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406))
    assert loading.load(workdir, "1").step == 1 and loading.load(workdir).step == 2
    for bad, message in (("7", "no checkpoint at step 7"), ("newest", "must be 'latest', 'best'")):
        with pytest.raises(ValueError, match=message):
            loading.load(workdir, bad)
    with pytest.raises(ValueError, match="holds no checkpoints/ folder"):
        loading.load(os.path.dirname(run[1][0]))


def test_variable_shapes_of_nets_with_dropout_and_aux_heads():
    """Shapes are traced in training mode (dropout rng given), so auxiliary heads are included."""
    model = create_model("googlenet", num_classes=3, aux_logits=True)
    shapes = loading.variable_shapes(model, 64)
    assert {"aux1", "aux2", "fc"} <= set(shapes["params"]) and "batch_stats" in shapes
    assert shapes["params"]["fc"]["kernel"].shape == (1024, 3)


def test_predict_batches_and_matches_the_model(run):
    from cnn_jax import predict

    workdir, images = run
    loaded = loading.load(workdir)
    x = np.stack([predict.load_image(p, IMAGE_SIZE, loaded.eval_crop_ratio) for p in images])
    probs = np.asarray(jax.nn.softmax(loaded.model.apply(loaded.variables, x, train=False)))
    small = predict.predict(workdir, images, k=3, batch_size=4)  # 9 images: 3 batches, padded
    assert small["step"] == 2 and len(small["results"]) == len(images)
    for row, a in zip(probs, small["results"]):
        order = np.argsort(-row)
        assert [p["index"] for p in a["predictions"]] == list(order)
        assert [p["name"] for p in a["predictions"]] == [f.CLASSES[i] for i in order]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]], row[order],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no image file at "):
        predict.predict(workdir, [images[0] + ".missing"])
    text = predict.format_text(small).splitlines()
    assert text[0] == images[0] and text[1].startswith("  1. ") and text[1].endswith(
        f"%  {small['results'][0]['predictions'][0]['name']}")


def test_predict_command(run):
    workdir, images = run
    proc = h.run_python(["-m", "cnn_jax.predict", f"--workdir={workdir}", "--checkpoint=best",
                         "--top_k=2", "--format=json", *images[:2]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [r["image"] for r in out["results"]] == images[:2]
    assert all(len(r["predictions"]) == 2 and r["predictions"][0]["name"] in f.CLASSES
               for r in out["results"])


def test_evaluate_every_protocol(run):
    from cnn_jax import evaluate

    workdir, _ = run
    final = metrics_lib.read_metrics(workdir, "eval")[-1]
    metrics, step, _ = evaluate.evaluate_checkpoint(workdir)
    assert step == 2 and metrics["count"] == 9
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert metrics["top1"] == pytest.approx(final["top1"])
    for protocol in ("ten_crop", "multiscale"):
        metrics, _, _ = evaluate.evaluate_checkpoint(workdir, protocol=protocol, batch_size=8)
        assert metrics["count"] == 9 and 0 < metrics["loss"] < 10
    with pytest.raises(ValueError, match="holds a checkpoint of arch='resnet20', not 'vgg11'"):
        evaluate.evaluate_checkpoint(workdir, "vgg11")


def test_fine_tune_from_a_training_workdir_gets_a_new_head(run):
    workdir, _ = run
    fresh = fast_init(create_model(h.TINY_ARCH, num_classes=10, **KWARGS),
                      jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
    variables, reinitialized = loading.init_from(workdir, fresh, arch=h.TINY_ARCH)
    assert sorted(reinitialized) == ["params/fc/bias", "params/fc/kernel"]
    chex.assert_trees_all_equal(variables["params"]["fc"], fresh["params"]["fc"])
    trained = loading.load(workdir).variables
    assert not np.allclose(trained["params"]["conv1"]["kernel"], fresh["params"]["conv1"]["kernel"])
    for tree in ("params", "batch_stats"):
        got, want = dict(variables[tree]), dict(trained[tree])
        got.pop("fc", None), want.pop("fc", None)
        chex.assert_trees_all_close(got, want)
    with pytest.raises(ValueError, match="holds 'resnet20' weights, not 'resnet32'"):
        loading.init_from(workdir, fresh, arch="resnet32")


@pytest.mark.parametrize("fmt", ["stablehlo", "saved_model"])
def test_export_reloads_with_the_same_logits(run, tmp_path, fmt):
    from cnn_jax import export

    workdir, _ = run
    out = str(tmp_path / fmt)
    export.export(workdir, out, fmt)
    meta = json.load(open(os.path.join(out, export.META_FILE)))
    assert meta["class_names"] == list(f.CLASSES) and meta["image_size"] == IMAGE_SIZE
    loaded = loading.load(workdir)
    x = np.random.default_rng(0).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    want = np.asarray(loaded.model.apply(loaded.variables, x, train=False))
    if fmt == "stablehlo":
        with open(os.path.join(out, "model.jax_exported"), "rb") as fh:
            exported = jax.export.deserialize(fh.read())
        assert "batch" in str(exported.in_avals[0].shape[0])  # symbolic batch dimension
        run_model = lambda images: np.asarray(exported.call(images))  # noqa: E731
    else:
        import tensorflow as tf

        reloaded = tf.saved_model.load(out)
        serve = reloaded.signatures["serving_default"]
        run_model = lambda images: serve(images=tf.constant(images))["output_0"].numpy()  # noqa
    for n in (1, 3):  # one export, any batch size
        np.testing.assert_allclose(run_model(x[:n]), want[:n], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        export.export(workdir, out, fmt)

