"""The real TFDS `imagenet2012` builder prepares a tiny fake download offline; the pipeline reads
it back with the right labels; missing archives give a clear error."""

import os

import numpy as np
import pytest

from cnn_jax import input_pipeline, preprocessing
from cnn_jax.datasets import sources

import _fake_imagenet


def _colour_label(images, labels, mask, expected):
    """Match each real example's mean colour to the nearest written colour; check its label."""
    mean, std = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)
    colours = np.array(list(expected))
    seen = []
    for image, label in zip(images[mask], labels[mask]):
        rgb = (image.astype(np.float32).mean((0, 1)) * std + mean) * 255
        k = int(np.argmin(np.abs(colours - rgb).sum(1)))
        assert np.abs(colours[k] - rgb).max() < 25, (rgb, colours[k])  # a solid colour stays one
        assert label == expected[tuple(colours[k])]
        seen.append(tuple(colours[k]))
    return seen


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    train, val = _fake_imagenet.write_fake_imagenet(sources.imagenet_manual_dir(data_dir))
    input_pipeline.prepare_dataset("imagenet2012", data_dir)
    return data_dir, train, val


def test_missing_archives_error(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.prepare_dataset("imagenet2012", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                 os.path.join(str(tmp_path), "downloads", "manual"),
                 "python -m cnn_jax.datasets.prepare --dataset=imagenet2012"):
        assert part in msg
    # Reading an unprepared ImageNet gives the same error, and nothing gets generated.
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="ILSVRC2012_img_val.tar"):
        input_pipeline.create_eval_iterator("imagenet2012", str(tmp_path), 2, 32,
                                            num_local_devices=1, process_index=0, process_count=1)
    assert not (tmp_path / "imagenet2012" / "5.1.0" / "dataset_info.json").exists()


def test_one_missing_archive_is_named(tmp_path):
    manual = sources.imagenet_manual_dir(str(tmp_path))
    _fake_imagenet.write_fake_imagenet(manual)
    os.remove(os.path.join(manual, "ILSVRC2012_img_val.tar"))
    with pytest.raises(input_pipeline.DatasetNotFoundError,
                       match=r"ILSVRC2012_img_val.tar is missing"):
        input_pipeline.prepare_dataset("imagenet2012", str(tmp_path))


def test_prepared_info(imagenet_dir):
    data_dir, train, val = imagenet_dir
    info = input_pipeline.get_dataset_info("imagenet2012", data_dir)
    assert info[:4] == ("imagenet2012", 1000, 6, 4) and info.class_names[0] == "n01440764"
    input_pipeline.prepare_dataset("imagenet2012", data_dir)  # idempotent


def test_validation_labels_from_tfds_label_file(imagenet_dir):
    data_dir, _, val = imagenet_dir
    # Labels of ILSVRC2012_val_00000001..4 according to the file shipped inside TFDS.
    names = _fake_imagenet.synset_names()
    assert sorted(val.values()) == sorted(names.index(s) for s in
                                          _fake_imagenet.validation_synsets(4))
    batches = list(input_pipeline.create_eval_iterator(
        "imagenet2012", data_dir, 3, 64, num_local_devices=1, process_index=0, process_count=1))
    assert len(batches) == 2  # 4 examples, batch 3: one padded batch
    images = np.concatenate([b["image"][0] for b in batches])
    labels = np.concatenate([b["label"][0] for b in batches])
    mask = np.concatenate([b["mask"][0] for b in batches])
    assert images.shape == (6, 64, 64, 3) and mask.sum() == 4
    assert sorted(_colour_label(images, labels, mask, val)) == sorted(val)


def test_train_labels_are_sorted_synset_indices(imagenet_dir):
    data_dir, train, _ = imagenet_dir
    assert sorted(train.values()) == [0, 1, 999]
    it = input_pipeline.create_train_iterator(
        "imagenet2012", data_dir, 6, 48, num_local_devices=2, process_index=0, process_count=1)
    for _ in range(2):  # two epochs of the six images
        batch = next(it)
        assert batch["image"].shape == (2, 3, 48, 48, 3)
        images, labels = batch["image"].reshape(6, 48, 48, 3), batch["label"].reshape(6)
        seen = _colour_label(images, labels, np.ones(6, bool), train)
        assert sorted(seen) == sorted(c for c in train for _ in range(2))


def test_prepare_command_names_the_archives(tmp_path, capsys):
    from cnn_jax.datasets import prepare

    assert prepare.main(["--dataset=imagenet2012", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ILSVRC2012_img_train.tar" in err


def test_evaluate_reads_a_converted_checkpoint(imagenet_dir, tmp_path):
    """`cnn_jax.evaluate` on a `cnn_jax.convert` output: the ImageNet recipe's eval (224 px centre
    crops) over the whole split, with the imported weights; loss and top-1 equal a direct apply."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnn_jax import convert, evaluate
    from cnn_jax.models import create_model

    from _variables import fast_init

    data_dir, _, val = imagenet_dir
    arch, kwargs = "resnet20", {"stage_sizes": (1, 1, 1), "widths": (4, 8, 8)}
    model = create_model(arch, num_classes=1000, **kwargs)
    variables = fast_init(model, jnp.zeros((1, 32, 32, 3)))
    # Large logits and non-trivial BN statistics: weights or statistics that were not read back
    # would change the loss far beyond the tolerance.
    variables["params"]["fc"]["kernel"] = variables["params"]["fc"]["kernel"] * 50
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda v: v + 0.1 * np.arange(v.size, dtype=v.dtype).reshape(v.shape) / v.size,
        variables["batch_stats"])
    source = str(tmp_path / "converted")
    convert.save_converted(source, arch, variables, kwargs)

    metrics, step, config = evaluate.evaluate_checkpoint(source, arch, data_dir=data_dir,
                                                         batch_size=3)
    assert (step, config.dataset, config.image_size) == (0, "imagenet2012", 224)
    assert metrics["count"] == len(val)

    batches = list(input_pipeline.create_eval_iterator(
        "imagenet2012", data_dir, 3, 224, num_local_devices=1, process_index=0, process_count=1))
    images = np.concatenate([b["image"][0] for b in batches])
    labels = np.concatenate([b["label"][0] for b in batches])
    mask = np.concatenate([b["mask"][0] for b in batches])
    logits = model.apply(variables, images[mask], train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels[mask]).mean()
    top1 = (np.argmax(logits, -1) == labels[mask]).mean()
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["top1"], top1)

    with pytest.raises(ValueError, match="holds a checkpoint of arch='resnet20', not 'resnet18'"):
        evaluate.evaluate_checkpoint(source, "resnet18", data_dir=data_dir)
