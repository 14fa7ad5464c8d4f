"""Where each dataset comes from: TFDS builders, preparation, and clear errors when data is missing.

Nothing here downloads: ``shapes`` is generated locally, ``imagenet2012`` is prepared from the
manually downloaded archives, ``folder:DIR`` is prepared from an image folder
(:mod:`cnn_jax.datasets.folder`), and ``cifar10``/``cifar100``/``imagenette`` or any other TFDS
image-classification dataset (``oxford_flowers102``, ...) must already be prepared in ``data_dir``
(e.g. copied from a machine where ``tfds build`` ran); their splits, class count and class names
come from the prepared ``DatasetInfo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from typing import Any, Dict, Optional, Tuple

import tensorflow_datasets as tfds

from cnn_jax import preprocessing
from cnn_jax.datasets import folder, shapes

DATASETS: Tuple[str, ...] = ("shapes", "imagenet2012", "cifar10", "cifar100", "imagenette", "fake")
IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class DatasetNotFoundError(ValueError):
    """A dataset is not prepared in ``data_dir`` (the message says what to put where)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How the pipeline reads a dataset: splits, encoding, normalization, augmentation defaults."""

    train_split: str = "train"
    eval_split: str = "validation"
    jpeg: bool = True  # images stored as JPEG (decode_and_crop_jpeg) rather than PNG
    mean: Tuple[float, float, float] = preprocessing.IMAGENET_MEAN
    std: Tuple[float, float, float] = preprocessing.IMAGENET_STD
    eval_crop_ratio: float = preprocessing.EVAL_CROP_RATIO
    augment_defaults: Dict[str, Any] = dataclasses.field(default_factory=dict)
    image_key: str = "image"
    label_key: str = "label"


# Small images get milder random-resized crops: below ~25% of a 32-64 px image little is left.
_SMALL_IMAGE_AUGMENT = {"area_range": (0.25, 1.0)}

SPECS: Dict[str, DatasetSpec] = {
    # shapes: colours are uniform random, so ImageNet statistics are as good as any.
    "shapes": DatasetSpec(augment_defaults=_SMALL_IMAGE_AUGMENT),
    "imagenet2012": DatasetSpec(),
    "imagenette": DatasetSpec(),
    # CIFAR is stored as PNG; evaluation keeps the whole 32x32 image.
    "cifar10": DatasetSpec(eval_split="test", jpeg=False, mean=preprocessing.CIFAR10_MEAN,
                           std=preprocessing.CIFAR10_STD, eval_crop_ratio=1.0,
                           augment_defaults=_SMALL_IMAGE_AUGMENT),
    "cifar100": DatasetSpec(eval_split="test", jpeg=False, mean=preprocessing.CIFAR100_MEAN,
                            std=preprocessing.CIFAR100_STD, eval_crop_ratio=1.0,
                            augment_defaults=_SMALL_IMAGE_AUGMENT),
    "fake": DatasetSpec(),
}


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (TFDS's own default)."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def resolve_data_dir(data_dir: Optional[str]) -> str:
    return os.path.expanduser(os.fspath(data_dir)) if data_dir else default_data_dir()


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """``"shapes/32px"`` -> ``("shapes", "32px")``; ``"folder:DIR"`` -> ``("folder", "/abs/DIR")``.

    A base name outside :data:`DATASETS` is a TFDS dataset name, checked when it is opened.
    """
    if folder.is_folder(name):
        return "folder", folder.folder_root(name)
    base, _, config = name.partition("/")
    if not base or not all(c.isalnum() or c in "_.:" for c in base):
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                         "folder:DIR or a prepared TFDS dataset (optionally with a config, e.g. "
                         "'shapes/32px')")
    return base, config or None


def canonical_name(name: str) -> str:
    """The name a checkpoint records: image folders get their absolute path."""
    return folder.canonical_name(name)


def is_builtin(name: str) -> bool:
    return split_name(name)[0] in DATASETS


def spec(name: str, builder: Any = None) -> DatasetSpec:
    """How to read ``name``; datasets other than the built-ins need their (prepared) builder."""
    base, _ = split_name(name)
    if base in SPECS:
        return SPECS[base]
    if base == "folder":
        return DatasetSpec(eval_split=builder.folder.eval_split)
    return _generic_spec(name, builder)


def _generic_spec(name: str, builder: Any) -> DatasetSpec:
    """Splits, features and encoding of a prepared TFDS image-classification dataset."""
    info = builder.info
    features = dict(info.features.items())
    keys = tuple(info.supervised_keys or ())
    if len(keys) == 2 and isinstance(keys[0], str) and isinstance(keys[1], str):
        image_key, label_key = keys
    else:
        image_key = next((k for k, f in features.items()
                          if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items()
                          if isinstance(f, tfds.features.ClassLabel)), None)
    if not (isinstance(features.get(image_key), tfds.features.Image)
            and isinstance(features.get(label_key), tfds.features.ClassLabel)):
        raise ValueError(f"{name} is not an image-classification dataset (it needs an Image and a "
                         f"ClassLabel feature; it has {', '.join(features.keys())})")
    splits = list(info.splits.keys())
    if "train" not in splits:
        raise ValueError(f"{name} has no 'train' split (splits: {', '.join(splits)})")
    eval_split = next((s for s in ("validation", "val", "test") if s in splits), None)
    if eval_split is None:
        raise ValueError(f"{name} has no validation or test split (splits: {', '.join(splits)})")
    image = features[image_key]
    small = all(isinstance(d, int) and d <= 64 for d in image.shape[:2])
    return DatasetSpec(
        eval_split=eval_split, jpeg=image.encoding_format == "jpeg",
        eval_crop_ratio=1.0 if small else preprocessing.EVAL_CROP_RATIO,
        augment_defaults=_SMALL_IMAGE_AUGMENT if small else {},
        image_key=image_key, label_key=label_key)


def shapes_config_for(image_size: Optional[int]) -> str:
    """Standard `shapes` config for a training resolution: the smallest one at least as large."""
    if image_size is None:
        return shapes.Shapes.DEFAULT_BUILDER_CONFIG_NAME
    for size in shapes.STANDARD_SIZES:
        if size >= image_size:
            return f"{size}px"
    return f"{shapes.STANDARD_SIZES[-1]}px"


def imagenet_manual_dir(data_dir: Optional[str]) -> str:
    return os.path.join(resolve_data_dir(data_dir), "downloads", "manual")


def make_builder(name: str, data_dir: Optional[str], image_size: Optional[int]):
    """The TFDS builder of ``name`` in ``data_dir``, prepared or not (nothing is written)."""
    base, config = split_name(name)
    data_dir = resolve_data_dir(data_dir)
    if base == "shapes":
        return shapes.Shapes(config=config or shapes_config_for(image_size), data_dir=data_dir)
    if base == "folder":
        return folder.make_builder(name, data_dir)
    return tfds.builder(name, data_dir=data_dir)


def _not_prepared_error(name: str, data_dir: Optional[str]) -> DatasetNotFoundError:
    base, _ = split_name(name)
    data_dir = resolve_data_dir(data_dir)
    if base == "imagenet2012":
        manual = imagenet_manual_dir(data_dir)
        missing = [f for f in IMAGENET_ARCHIVES if not os.path.exists(os.path.join(manual, f))]
        if missing:
            return DatasetNotFoundError(
                f"imagenet2012 is not prepared in {data_dir} and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar (from https://image-net.org/download-images) in {manual}, "
                f"then run `python -m cnn_jax.datasets.prepare --dataset=imagenet2012 "
                f"--data_dir={data_dir}`")
        return DatasetNotFoundError(
            f"imagenet2012 is not prepared in {data_dir} (the archives are in {manual}): run "
            f"`python -m cnn_jax.datasets.prepare --dataset=imagenet2012 --data_dir={data_dir}` "
            "(several hours, ~150 GB)")
    if base == "shapes":
        return DatasetNotFoundError(
            f"{name} is not prepared in {data_dir}: run `python -m cnn_jax.datasets.prepare "
            f"--dataset={name} --data_dir={data_dir}` (seconds, offline)")
    if base not in DATASETS and base not in tfds.list_builders(with_community_datasets=False):
        return DatasetNotFoundError(
            f"unknown dataset {name!r}: not one of {', '.join(DATASETS)}, not folder:DIR, and "
            f"neither a TFDS dataset nor prepared in {data_dir}")
    return DatasetNotFoundError(
        f"{name} is not prepared in {data_dir} and is never downloaded at run time: on a machine "
        f"with internet run `tfds build {name} --data_dir=<dir>` and copy <dir>/{base} to "
        f"{data_dir}/{base}")


def get_builder(name: str, data_dir: Optional[str], image_size: Optional[int] = None,
                prepare_shapes: bool = False, rescan: bool = False):
    """The prepared TFDS builder of ``name``; ``shapes`` is generated on demand if asked to.

    ``folder:DIR`` is always prepared on demand (local files, offline); ``rescan`` lists the
    folder again instead of using this process's earlier listing. Raises
    ``DatasetNotFoundError`` when the dataset is not prepared in ``data_dir``.
    """
    base, _ = split_name(name)
    if base == "fake":
        raise ValueError("'fake' has no TFDS builder")
    if base == "folder":
        return _prepare_folder(name, data_dir, rescan)
    try:
        builder = make_builder(name, data_dir, image_size)
    except tfds.core.registered.DatasetNotFoundError as e:  # unknown TFDS name or config
        if base not in DATASETS and base not in tfds.list_builders(with_community_datasets=False):
            raise _not_prepared_error(name, data_dir) from None
        raise DatasetNotFoundError(f"{name}: {e}".splitlines()[0]) from None
    if not builder.is_prepared():
        if base == "shapes" and prepare_shapes:
            prepare(name, data_dir, image_size)
            builder = make_builder(name, data_dir, image_size)
        else:
            raise _not_prepared_error(name, data_dir)
    return builder


@contextlib.contextmanager
def _file_lock(path: str):
    """Inter-process lock, so that processes sharing a data_dir do not prepare twice at once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# folder:DIR -> the listing this process uses (see cnn_jax.datasets.folder on change detection).
_FOLDER_SCANS: Dict[str, Any] = {}


def _prepare_folder(name: str, data_dir: Optional[str], rescan: bool = False):
    data_dir = resolve_data_dir(data_dir)
    key = folder.canonical_name(name)
    if rescan or key not in _FOLDER_SCANS:
        _FOLDER_SCANS[key] = folder.scan(name)
    scan = _FOLDER_SCANS[key]
    builder = folder.make_builder(name, data_dir, scan)
    if builder.is_prepared():
        return builder
    with _file_lock(os.path.join(data_dir, f".{folder.ImageFolderRecords.name}.prepare.lock")):
        return folder.prepare(name, data_dir, scan)  # another process may have finished it


def prepare(name: str, data_dir: Optional[str], image_size: Optional[int] = None) -> None:
    """Prepare ``name`` in ``data_dir`` (idempotent); see the module docstring for each source."""
    base, _ = split_name(name)
    if base == "fake":
        return
    data_dir = resolve_data_dir(data_dir)
    if base == "folder":
        _prepare_folder(name, data_dir, rescan=True)
        return
    if base not in ("shapes", "imagenet2012"):
        get_builder(name, data_dir)  # only checks: these are never downloaded here
        return
    builder = make_builder(name, data_dir, image_size)
    if builder.is_prepared():
        return
    config = None
    if base == "imagenet2012":
        manual = imagenet_manual_dir(data_dir)
        if not all(os.path.exists(os.path.join(manual, f)) for f in IMAGENET_ARCHIVES):
            raise _not_prepared_error(name, data_dir)
        config = tfds.download.DownloadConfig(manual_dir=manual)
    lock = os.path.join(data_dir, f".{base}.prepare.lock")
    with _file_lock(lock):
        builder = make_builder(name, data_dir, image_size)  # another process may have finished
        if not builder.is_prepared():
            builder.download_and_prepare(download_config=config, file_format="tfrecord")
