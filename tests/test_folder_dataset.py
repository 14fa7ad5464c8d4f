"""`--dataset=folder:DIR` (image folders prepared through TFDS); prepared TFDS datasets by name."""

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import _image_folders as f
from cnn_jax import input_pipeline
from cnn_jax.datasets import folder, sources


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder with every format and mode, one corrupt and one truncated file, prepared once."""
    root = f.make_folder(str(tmp_path_factory.mktemp("images") / "my images"))
    with open(os.path.join(root, "train", "circle", "corrupt.png"), "wb") as fh:
        fh.write(b"not an image")
    good = io.BytesIO()
    Image.fromarray(f.pixels(0, 99, 30, 30)).save(good, format="JPEG")
    with open(os.path.join(root, "train", "square", "truncated.jpg"), "wb") as fh:
        fh.write(good.getvalue()[:200])
    with open(os.path.join(root, "train", "square", "notes.txt"), "w") as fh:
        fh.write("ignored: not an image extension")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return root, data_dir


def test_folder_is_prepared_with_class_names_and_skips_unreadable_files(prepared, capsys):
    root, data_dir = prepared
    name = f"folder:{root}"
    info = input_pipeline.get_dataset_info(name, data_dir)
    out = capsys.readouterr().out
    assert info.class_names == f.CLASSES and info.num_classes == 3
    assert (info.num_train_examples, info.num_eval_examples) == (21, 9)  # 2 unreadable skipped
    assert "skipped 2 unreadable file(s): train/circle/corrupt.png" in out
    assert "train/square/truncated.jpg" in out
    builder = sources.get_builder(name, data_dir)
    assert sorted(builder.info.metadata["skipped"])[0].startswith("train/circle/corrupt.png")
    assert builder.info.file_format.value == "tfrecord"

    # Every image became RGB; an RGB JPEG is stored as it was, lossless sources stay close.
    examples = {e["file_name"].decode(): e for e in tfds.as_numpy(builder.as_dataset("train"))}
    assert len(examples) == 21
    for rel, e in examples.items():
        ext, mode, _ = next(x for x in f.FORMATS if rel.endswith("." + x[0]))
        assert e["image"].ndim == 3 and e["image"].shape[-1] == 3
        assert e["label"] == f.CLASSES.index(rel.split("/")[1])
        with Image.open(os.path.join(root, rel)) as source:
            expected = np.asarray(source.convert("RGB"), np.int32)
        assert e["image"].shape == expected.shape  # mixed sizes are kept
        if mode in ("RGBA", "L", "LA"):  # PNG/BMP sources: converted as PIL does, then JPEG
            buf = io.BytesIO()
            Image.fromarray(expected.astype(np.uint8)).save(buf, format="JPEG", quality=95)
            roundtrip = np.asarray(Image.open(buf), np.int32)
            # TF's and PIL's JPEG decoders differ by a grey level here and there.
            assert np.abs(e["image"].astype(np.int32) - roundtrip).mean() < 2, rel
    raw = next(iter(builder.as_dataset("train", decoders={"image": tfds.decode.SkipDecoding()})
                    .filter(lambda e: e["file_name"] == b"train/circle/train_0.jpg")))
    with open(os.path.join(root, "train/circle/train_0.jpg"), "rb") as fh:
        assert raw["image"].numpy() == fh.read()


def test_folder_reads_through_the_pipeline(prepared):
    root, data_dir = prepared
    name = f"folder:{root}"
    train = input_pipeline.create_train_iterator(name, data_dir, 8, 16, num_local_devices=1,
                                                 process_index=0, process_count=1)
    batch = next(train)
    assert batch["image"].shape == (1, 8, 16, 16, 3) and batch["label"].max() < 3
    evals = list(input_pipeline.create_eval_iterator(name, data_dir, 4, 16, num_local_devices=1,
                                                     process_index=0, process_count=1))
    mask = np.concatenate([b["mask"][0] for b in evals])
    labels = np.concatenate([b["label"][0] for b in evals])[mask]
    assert mask.sum() == 9 and len(mask) == 12 and sorted(labels) == [0] * 3 + [1] * 3 + [2] * 3


def test_changed_folder_is_prepared_again(tmp_path, capsys):
    root = f.make_folder(str(tmp_path / "pets"), n_train=2, n_val=1, classes=("cat", "dog"))
    data_dir = str(tmp_path / "tfds")
    name = f"folder:{root}"
    assert input_pipeline.get_dataset_info(name, data_dir).num_train_examples == 4
    capsys.readouterr()
    assert input_pipeline.get_dataset_info(name, data_dir).num_train_examples == 4
    assert "prepared" not in capsys.readouterr().out  # unchanged: read, not prepared again
    f.write_image(os.path.join(root, "train", "cat", "new.png"), f.pixels(0, 7, 20, 20))
    assert input_pipeline.get_dataset_info(name, data_dir).num_train_examples == 5
    assert "prepared" in capsys.readouterr().out
    # The iterators keep the listing of the run's start (get_dataset_info) while files change.
    os.remove(os.path.join(root, "train", "dog", "train_0.png"))
    evals = input_pipeline.create_eval_iterator(name, data_dir, 2, 8, num_local_devices=1,
                                                process_index=0, process_count=1)
    assert sum(b["mask"].sum() for b in evals) == 2
    assert "prepared" not in capsys.readouterr().out
    assert input_pipeline.get_dataset_info(name, data_dir).num_train_examples == 4
    # Earlier preparations stay (another run may read them) and are named.
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("prepared "))
    earlier = line.split("earlier preparation(s) of this folder, to delete when no run reads "
                         "them: ")[1].split(", ")
    assert len(earlier) == 2 and all(os.path.isdir(p) for p in earlier)
    assert len(os.listdir(os.path.join(data_dir, folder.ImageFolderRecords.name))) == 3
    # A relative path names the same dataset (checkpoints record the absolute one).
    assert input_pipeline.canonical_name(f"folder:{os.path.relpath(root)}") == name


def _layout(tmp_path, case):
    root = str(tmp_path / "d")
    if case == "not_a_directory":
        return root
    f.make_folder(root, n_train=1, n_val=1, classes=("a", "b"))
    if case == "no_train":
        shutil.rmtree(os.path.join(root, "train"))
    elif case == "no_eval":
        shutil.rmtree(os.path.join(root, "val"))
    elif case == "class_in_one_split":
        os.makedirs(os.path.join(root, "train", "c"))
        f.write_image(os.path.join(root, "train", "c", "x.png"), f.pixels(2, 0, 8, 8))
    elif case == "empty_class":
        for name in os.listdir(os.path.join(root, "val", "b")):
            os.remove(os.path.join(root, "val", "b", name))
    elif case == "no_images":
        for split in ("train", "val"):
            shutil.rmtree(os.path.join(root, split))
            os.makedirs(os.path.join(root, split))
        f.write_image(os.path.join(root, "train", "loose.png"), f.pixels(0, 0, 8, 8))
    elif case == "single_class":
        shutil.rmtree(os.path.join(root, "train", "b"))
        shutil.rmtree(os.path.join(root, "val", "b"))
    return root


@pytest.mark.parametrize("case, message", [
    ("not_a_directory", "is not a directory"),
    ("no_train", "has no train/ folder: put the training images in"),
    ("no_eval", "has no evaluation split: add"),
    ("class_in_one_split", "class folder 'c' is in"),
    ("empty_class", "/val/b holds no images"),
    ("no_images", "has no class folders (1 images lie directly in it)"),
    ("single_class", "has a single class ('a'): a classifier needs at least two"),
])
def test_folder_errors(tmp_path, case, message):
    root = _layout(tmp_path, case)
    with pytest.raises(ValueError, match=None) as e:
        input_pipeline.get_dataset_info(f"folder:{root}", str(tmp_path / "tfds"))
    assert message in str(e.value) and "\n" not in str(e.value)


class TinyFlowers(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a TFDS image-classification dataset (PNG images, a 'test' split only)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "kind": tfds.features.ClassLabel(names=["rose", "tulip"])}),
            supervised_keys=("picture", "kind"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"picture": f.pixels(i % 2, i, 12, 10), "kind": i % 2}


def test_a_prepared_tfds_dataset_by_name(tmp_path):
    data_dir = str(tmp_path)
    TinyFlowers(data_dir=data_dir).download_and_prepare(file_format="tfrecord")
    info = input_pipeline.get_dataset_info("tiny_flowers", data_dir)
    assert (info.num_classes, info.class_names) == (2, ("rose", "tulip"))
    assert (info.num_train_examples, info.num_eval_examples) == (6, 3)
    batch = next(input_pipeline.create_train_iterator(
        "tiny_flowers", data_dir, 2, 8, num_local_devices=1, process_index=0, process_count=1))
    assert batch["image"].shape == (1, 2, 8, 8, 3)
    evals = list(input_pipeline.create_eval_iterator(
        "tiny_flowers", data_dir, 2, 8, num_local_devices=1, process_index=0, process_count=1))
    labels = np.concatenate([b["label"][0] for b in evals])
    mask = np.concatenate([b["mask"][0] for b in evals])
    assert sorted(labels[mask]) == [0, 0, 1]


@pytest.mark.parametrize("name, message", [
    ("oxford_flowers102", "oxford_flowers102 is not prepared in"),
    ("no_such_dataset_xyz", "unknown dataset 'no_such_dataset_xyz'"),
])
def test_unprepared_or_unknown_tfds_names(tmp_path, name, message):
    with pytest.raises(ValueError) as e:
        input_pipeline.get_dataset_info(name, str(tmp_path))
    assert message in str(e.value)
