"""Input pipeline: preprocessing, batch layout, eval coverage, process shards, resumption."""

import hashlib
import io
import itertools

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cnn_jax import input_pipeline, preprocessing
from cnn_jax.datasets import sources

NAME = "shapes/32px_n200_v50"
N_TRAIN, N_EVAL, SIZE = 200, 50, 32
LOW = (0 - np.array(preprocessing.IMAGENET_MEAN)) / np.array(preprocessing.IMAGENET_STD)
HIGH = (1 - np.array(preprocessing.IMAGENET_MEAN)) / np.array(preprocessing.IMAGENET_STD)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.prepare_dataset(NAME, d)
    return d


def _encoded(height, width, fmt="JPEG", seed=0):
    """A smooth random image (plus a bright top-left corner, to see flips) as JPEG/PNG bytes."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR)).copy()
    image[: height // 4, : width // 4] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


def _fingerprints(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def _layout(devices=1, index=0, count=1):
    return dict(num_local_devices=devices, process_index=index, process_count=count)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("fmt,jpeg", [("JPEG", True), ("PNG", False)])
def test_train_crop_and_flip_keep_shape_and_range(fmt, jpeg):
    data = tf.constant(_encoded(90, 140, fmt))
    outs = [preprocessing.preprocess_for_train(data, tf.constant([s, 7], tf.int64), 48, jpeg=jpeg)
            for s in range(6)]
    for out in outs:
        chex.assert_shape(out, (48, 48, 3))
        assert out.dtype == tf.float32
        assert np.all(out.numpy() >= LOW - 1e-5) and np.all(out.numpy() <= HIGH + 1e-5)
    # Stateless: the seed alone decides the crop; different seeds give different crops.
    again = preprocessing.preprocess_for_train(data, tf.constant([0, 7], tf.int64), 48, jpeg=jpeg)
    np.testing.assert_array_equal(outs[0].numpy(), again.numpy())
    assert len(set(_fingerprints([o.numpy() for o in outs]))) == 6


def test_flip_mirrors_the_centre_crop():
    data = tf.constant(_encoded(64, 64))
    plain = preprocessing.preprocess_for_train(data, tf.constant([0, 0], tf.int64), 32,
                                               augment=preprocessing.parse_augment("none")).numpy()
    augment = preprocessing.parse_augment("none,flip=true")
    outs = {preprocessing.preprocess_for_train(data, tf.constant([s, 0], tf.int64), 32,
                                               augment=augment).numpy().tobytes()
            for s in range(16)}
    assert outs == {plain.tobytes(), plain[:, ::-1].tobytes()}


def test_bfloat16_output():
    data = tf.constant(_encoded(50, 40))
    out = preprocessing.preprocess_for_train(data, tf.constant([1, 2], tf.int64), 32,
                                             dtype="bfloat16")
    assert out.dtype == tf.bfloat16 and out.shape == (32, 32, 3)
    out = preprocessing.preprocess_for_eval(data, 32, dtype="bfloat16")
    assert out.dtype == tf.bfloat16


def test_random_resized_window_statistics():
    shape = tf.constant([300, 400, 3])
    areas, ratios = [], []
    for s in range(200):
        seed = tf.constant([s, 1], tf.int64)
        y, x, h, w = preprocessing.random_resized_window(shape, seed).numpy()
        assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
        areas.append(h * w / (300 * 400))
        ratios.append(w / h)
    assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
    assert min(ratios) >= 3 / 4 - 0.05 and max(ratios) <= 4 / 3 + 0.05
    assert np.std(areas) > 0.1  # really random
    # No window of area >= 8% with aspect 3/4..4/3 fits a 10x1000 strip: centre-crop fallback.
    window = preprocessing.random_resized_window(tf.constant([10, 1000, 3]),
                                                 tf.constant([0, 0], tf.int64))
    np.testing.assert_array_equal(window.numpy(), preprocessing.center_window(
        tf.constant([10, 1000, 3]), preprocessing.EVAL_CROP_RATIO).numpy())


def test_center_and_scale_jitter_windows():
    # Eval: 0.875 of the shorter side, centred (= resize to 256, centre crop 224).
    window = preprocessing.center_window(tf.constant([256, 320, 3]), 0.875).numpy()
    np.testing.assert_array_equal(window, [16, 48, 224, 224])
    # VGG with S fixed at 256: a 224 crop of the image rescaled to shorter side 256.
    for s in range(5):
        y, x, h, w = preprocessing.scale_jitter_window(
            tf.constant([384, 512, 3]), tf.constant([s, 0], tf.int64), 224, (256, 256)).numpy()
        assert h == w == 336  # 224 * 384 / 256
        assert 0 <= y <= 384 - 336 and 0 <= x <= 512 - 336
    # S ~ U[256, 512]: crop sides between 224*384/512 and 224*384/256.
    sides = [preprocessing.scale_jitter_window(tf.constant([384, 512, 3]),
                                               tf.constant([s, 1], tf.int64), 224,
                                               (256, 512)).numpy()[2] for s in range(50)]
    assert 168 <= min(sides) and max(sides) <= 336 and np.std(sides) > 10


def test_pca_lighting_and_scale_jitter_run():
    data = tf.constant(_encoded(120, 160))
    seed = tf.constant([3, 4], tf.int64)
    base = preprocessing.parse_augment("vgg")
    assert base.crop == "scale_jitter" and base.scale_jitter == (256, 512)
    plain = preprocessing.preprocess_for_train(data, seed, 64, augment=base).numpy()
    lit = preprocessing.preprocess_for_train(
        data, seed, 64, augment=preprocessing.parse_augment("vgg,pca_lighting=true")).numpy()
    chex.assert_shape(lit, (64, 64, 3))
    # Lighting noise adds one RGB offset to every pixel (same crop: same seed).
    diff = (lit - plain) * np.array(preprocessing.IMAGENET_STD)
    np.testing.assert_allclose(diff, np.broadcast_to(diff[0, 0], diff.shape), atol=1e-4)
    assert np.abs(diff[0, 0]).max() > 1e-4
    alexnet = preprocessing.parse_augment("alexnet")
    assert alexnet.pca_lighting and alexnet.scale_jitter == (256, 256)
    chex.assert_shape(preprocessing.preprocess_for_train(data, seed, 64, augment=alexnet),
                      (64, 64, 3))


def test_parse_augment():
    assert preprocessing.parse_augment(None) == preprocessing.AugmentConfig()
    cfg = preprocessing.parse_augment({"flip": False, "scale_jitter": [256, 512]})
    assert cfg.crop == "scale_jitter" and cfg.scale_jitter == (256, 512) and not cfg.flip
    cfg = preprocessing.parse_augment("scale_jitter=300:400,pca_lighting=true")
    assert cfg.scale_jitter == (300, 400) and cfg.pca_lighting
    cfg = preprocessing.parse_augment(None, base={"area_range": (0.25, 1.0)})
    assert cfg.area_range == (0.25, 1.0)
    with pytest.raises(ValueError, match="unknown augmentation option"):
        preprocessing.parse_augment({"flipp": True})
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        preprocessing.parse_augment("resnet")
    with pytest.raises(ValueError, match="needs scale_jitter"):
        preprocessing.parse_augment("crop=scale_jitter")


# ----------------------------------------------------------------------------- training stream


def test_train_batches_layout_and_range(data_dir):
    it = input_pipeline.create_train_iterator(NAME, data_dir, 24, SIZE, **_layout(devices=3))
    for batch in itertools.islice(it, 3):
        chex.assert_shape(batch["image"], (3, 8, SIZE, SIZE, 3))
        chex.assert_shape(batch["label"], (3, 8))
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert np.all(batch["image"] >= LOW - 1e-5) and np.all(batch["image"] <= HIGH + 1e-5)
        assert batch["label"].min() >= 0 and batch["label"].max() < 10
    batch = next(input_pipeline.create_train_iterator(NAME, data_dir, 8, 24, dtype="bfloat16",
                                                      augment="vgg,pca_lighting=true",
                                                      **_layout(devices=2)))
    assert batch["image"].dtype == jax.numpy.bfloat16 and batch["image"].shape == (2, 4, 24, 24, 3)


def test_resume_equals_uninterrupted_stream(data_dir):
    # 200 examples, batch 16: epochs end inside steps 12 and 25.
    kwargs = dict(seed=3, **_layout(devices=2))
    full = list(itertools.islice(
        input_pipeline.create_train_iterator(NAME, data_dir, 16, SIZE, **kwargs), 28))
    for start in (11, 13, 25):
        resumed = list(itertools.islice(input_pipeline.create_train_iterator(
            NAME, data_dir, 16, SIZE, start_step=start, **kwargs), 3))
        for a, b in zip(full[start:start + 3], resumed):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    # Another seed, another stream.
    other = next(input_pipeline.create_train_iterator(NAME, data_dir, 16, SIZE, seed=4,
                                                      **_layout(devices=2)))
    assert not np.array_equal(other["image"], full[0]["image"])


def test_private_input_threads_give_the_same_batches(data_dir):
    # The loop gives tf.data one private thread beside CPU training (threads_beside): same stream.
    kwargs = dict(seed=3, **_layout(devices=2))
    for make, n in ((lambda **k: input_pipeline.create_train_iterator(
            NAME, data_dir, 16, SIZE, **kwargs, **k), 14),
                    (lambda **k: input_pipeline.create_eval_iterator(
                        NAME, data_dir, 16, SIZE, **_layout(devices=2), **k), None)):
        for a, b in zip(itertools.islice(make(), n), itertools.islice(make(threads=1), n)):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    assert input_pipeline.threads_beside("cpu", 2) == 1
    assert input_pipeline.threads_beside("cpu", 64) == 8
    assert input_pipeline.threads_beside("gpu", 2) == 0  # tf.data autotunes beside accelerators


@pytest.mark.parametrize("dtype,index,count,start", [("float32", 0, 1, 0), ("float32", 1, 2, 11),
                                                     ("bfloat16", 0, 1, 23)])
def test_cached_decoding_gives_the_same_batches(data_dir, monkeypatch, dtype, index, count, start):
    # A centre crop plus a flip is decoded once and kept in memory: the same examples, flips and
    # order as decoding every step, across epoch ends (200 / 16), process shards and resumption.
    kwargs = dict(seed=5, start_step=start, dtype=dtype, augment="none,flip=true",
                  **_layout(devices=2, index=index, count=count))
    decoded = []
    real = input_pipeline._decoded
    monkeypatch.setattr(input_pipeline, "_decoded", lambda *a: decoded.append(1) or real(*a))
    cached = list(itertools.islice(input_pipeline.create_train_iterator(
        NAME, data_dir, 16, SIZE, **kwargs), 26))
    assert decoded == [1]
    monkeypatch.setattr(input_pipeline, "CACHE_MAX_BYTES", 0)  # too big for the cache
    every_step = list(itertools.islice(input_pipeline.create_train_iterator(
        NAME, data_dir, 16, SIZE, **kwargs), 26))
    assert decoded == [1]
    flipped = 0
    for a, b in zip(cached, every_step):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        flipped += int(np.sum(a["image"][..., 0, 0] != a["image"][..., -1, 0]))
    assert flipped  # not every image the same way round
    # Random crops are not fixed per image: those decode every step.
    assert not preprocessing.is_fixed_then_flipped(preprocessing.parse_augment("inception"))
    with pytest.raises(ValueError, match="not a fixed transform"):
        preprocessing.preprocess_fixed(tf.constant(b""), SIZE,
                                       augment=preprocessing.parse_augment("inception"))


def _epoch_fingerprints(data_dir, steps, batch, **layout):
    it = input_pipeline.create_train_iterator(NAME, data_dir, batch, SIZE, augment="none", **layout)
    out = []
    for b in itertools.islice(it, steps):
        out += _fingerprints(b["image"].reshape(-1, SIZE, SIZE, 3))
    return out


def test_train_epochs_and_process_shards(data_dir):
    # One process: each epoch is a permutation of the split, reshuffled between epochs.
    two_epochs = _epoch_fingerprints(data_dir, 20, 20, **_layout())
    first, second = two_epochs[:N_TRAIN], two_epochs[N_TRAIN:]
    assert len(set(first)) == N_TRAIN and set(first) == set(second) and first != second
    # Two processes: disjoint halves whose union is the split.
    shards = [_epoch_fingerprints(data_dir, 10, 20, **_layout(devices=2, index=i, count=2))
              for i in range(2)]
    assert all(len(set(s)) == N_TRAIN // 2 for s in shards)
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(first)


# ----------------------------------------------------------------------------- evaluation


def _eval_examples(data_dir, batch, devices, count):
    """{fingerprint: label} over all processes, asserting each real example appears once."""
    seen, labels, num_batches = [], {}, set()
    for index in range(count):
        batches = list(input_pipeline.create_eval_iterator(
            NAME, data_dir, batch, SIZE, **_layout(devices, index, count)))
        num_batches.add(len(batches))
        for b in batches:
            chex.assert_shape(b["image"], (devices, batch // (devices * count), SIZE, SIZE, 3))
            chex.assert_shape([b["label"], b["mask"]], [(devices, batch // (devices * count))] * 2)
            assert b["mask"].dtype == np.bool_
            images = b["image"].reshape(-1, SIZE, SIZE, 3)
            mask, lab = b["mask"].reshape(-1), b["label"].reshape(-1)
            assert not images[~mask].any()  # padding is zeros
            for fp, label in zip(_fingerprints(images[mask]), lab[mask]):
                seen.append(fp)
                labels[fp] = int(label)
    assert len(num_batches) == 1  # every process runs the same number of steps
    assert len(seen) == len(set(seen)) == N_EVAL
    return labels


@pytest.fixture(scope="module")
def eval_reference(data_dir):
    """Every example once, in one batch of 50 on one device of one process."""
    return _eval_examples(data_dir, 50, 1, 1)


@pytest.mark.parametrize("devices,count,batch", [(1, 1, 7), (3, 1, 12), (8, 1, 16), (3, 2, 12),
                                                 (8, 2, 16), (8, 2, 64)])
def test_eval_covers_every_example_once(data_dir, eval_reference, devices, count, batch):
    assert _eval_examples(data_dir, batch, devices, count) == eval_reference


# ----------------------------------------------------------------------------- errors, fake, info


def test_batch_not_divisible(data_dir):
    with pytest.raises(ValueError, match="not divisible by the number of devices"):
        input_pipeline.create_train_iterator(NAME, data_dir, 12, SIZE, **_layout(8))
    with pytest.raises(ValueError, match=r"2 process\(es\) x 3 local device\(s\) = 6"):
        input_pipeline.create_eval_iterator(NAME, data_dir, 8, SIZE, **_layout(3, 0, 2))


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="unknown dataset 'mnistt'"):
        input_pipeline.get_dataset_info("mnistt", data_dir)
    with pytest.raises(ValueError, match="mnist is not prepared in"):  # a TFDS name: not fetched
        input_pipeline.get_dataset_info("mnist", data_dir)
    with pytest.raises(ValueError, match="dtype must be one of"):
        input_pipeline.create_train_iterator(NAME, data_dir, 8, SIZE, dtype="float64", **_layout())


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenette"])
def test_unprepared_datasets_are_never_downloaded(tmp_path, name):
    with pytest.raises(input_pipeline.DatasetNotFoundError) as e:
        input_pipeline.create_train_iterator(name, str(tmp_path), 8, SIZE, **_layout())
    assert "\n" not in str(e.value) and f"tfds build {name}" in str(e.value)
    with pytest.raises(input_pipeline.DatasetNotFoundError):
        input_pipeline.prepare_dataset(name, str(tmp_path))
    assert not (tmp_path / "downloads").exists() and not (tmp_path / name).exists()


def test_dataset_info(data_dir):
    info = input_pipeline.get_dataset_info(NAME, data_dir)
    assert info[:4] == (NAME, 10, N_TRAIN, N_EVAL) and info.class_names[:2] == ("circle", "ellipse")
    assert input_pipeline.get_dataset_info("fake", None).num_classes == 1000
    assert set(input_pipeline.DATASETS) == {"shapes", "imagenet2012", "cifar10", "cifar100",
                                            "imagenette", "fake"}
    assert sources.default_data_dir()


def test_fake_dataset():
    it = input_pipeline.create_train_iterator("fake", None, 12, 16, **_layout(devices=3))
    a, b = next(it), next(it)
    chex.assert_shape(a["image"], (3, 4, 16, 16, 3))
    assert a["label"].dtype == np.int32 and not np.array_equal(a["label"], b["label"])
    resumed = next(input_pipeline.create_train_iterator("fake", None, 12, 16, start_step=1,
                                                        **_layout(devices=3)))
    np.testing.assert_array_equal(resumed["label"], b["label"])
    bf16 = next(input_pipeline.create_train_iterator("fake", None, 4, 8, dtype="bfloat16",
                                                     **_layout()))
    assert bf16["image"].dtype == jax.numpy.bfloat16
    total = 0
    for index in range(3):
        for batch in input_pipeline.create_eval_iterator("fake", None, 3000, 8,
                                                         **_layout(2, index, 3)):
            total += int(batch["mask"].sum())
    assert total == input_pipeline.FAKE_INFO["num_eval_examples"]


def test_benchmark_runs():
    from cnn_jax import benchmark_input

    result = benchmark_input.run_benchmark(batch_size=4, image_size=32, num_batches=2, warmup=1,
                                           source_size="64x48", num_images=3)
    assert result["images_per_second"] > 0 and result["images_per_cpu_second"] > 0
    assert "64x48" in result["what"]


def test_prepare_command(tmp_path, capsys):
    from cnn_jax.datasets import prepare

    assert prepare.main(["--dataset=shapes/16px_n20_v10", f"--data_dir={tmp_path}"]) == 0
    assert "train=20, validation=10" in capsys.readouterr().out
    assert prepare.main(["--dataset=cifar10", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10 is not prepared") and err.count("\n") == 1
