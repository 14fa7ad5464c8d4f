"""Image-folder datasets (``--dataset=folder:DIR``), prepared once through TFDS into TFRecords.

``DIR`` has the ImageFolder layout of torchvision and ``tfds.ImageFolder``::

    DIR/train/<class>/<images>     (sub-folders inside a class folder are read too)
    DIR/val/<class>/<images>       (or validation/ or test/: the first one present is evaluated)

Class names are the folder names, sorted; JPEG, PNG, GIF, BMP and WebP files are read (by
extension, case-insensitive; other files and hidden files are ignored). Preparing decodes every
image once: RGB JPEGs are stored as they are, every other image (PNG, GIF's first frame, BMP, WebP,
grayscale, RGBA/palette, CMYK JPEG) is converted to RGB the way torchvision's loader does
(``PIL.Image.convert("RGB")``) and stored as a quality-95 JPEG, as TFDS's imagenet2012 builder does
with ImageNet's CMYK and PNG files, so the pipeline crops on the JPEG header like for ImageNet.

Files that cannot be decoded (truncated, corrupt, not really images) are skipped and counted: the
preparation prints how many and which, and ``info.metadata['skipped']`` keeps the list.

The TFDS config name holds a fingerprint of the directory listing (relative paths, sizes and
modification times), so a folder whose files are added, removed or rewritten is prepared again
instead of being read stale. Within one process the listing is read once per dataset (by
:func:`cnn_jax.input_pipeline.get_dataset_info`, at the start of a run), so the training and
evaluation of a run read the same preparation even if files change meanwhile. Earlier
preparations are not deleted (another run may still read them): the line printed on preparing
names them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import tensorflow_datasets as tfds

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
EVAL_SPLITS = ("val", "validation", "test")
JPEG_QUALITY = 95


class _CustomConfigFilter(logging.Filter):
    """Every folder is a custom TFDS config by design, prepared on first use: TFDS's warnings
    about a custom config and a not yet written dataset_info.json are noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Using custom data configuration: FolderConfig" in message or (
            "has no dataset_info.json" in message and ImageFolderRecords.name in message))


logging.getLogger("absl").addFilter(_CustomConfigFilter())


class FolderError(ValueError):
    """The folder does not have the layout or content a dataset needs (the message says what)."""


@dataclasses.dataclass(frozen=True)
class FolderScan:
    root: str
    eval_split: str
    class_names: Tuple[str, ...]
    files: Dict[str, Tuple[Tuple[str, int], ...]]  # split -> ((path relative to root, label), ...)
    fingerprint: str

    @property
    def config_name(self) -> str:
        return f"{_slug(self.root)}_{_path_hash(self.root)}_{self.fingerprint[:12]}"


def is_folder(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_root(name: str) -> str:
    root = name[len(PREFIX):]
    if not root:
        raise FolderError("--dataset=folder: needs a directory, e.g. --dataset=folder:~/my_images")
    return os.path.abspath(os.path.expanduser(root)).rstrip(os.sep) or os.sep


def canonical_name(name: str) -> str:
    """``folder:rel/dir`` -> ``folder:/abs/rel/dir``: a checkpoint's dataset works from any cwd."""
    return PREFIX + folder_root(name) if is_folder(name) else name


def _slug(root: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40] or "root"


def _path_hash(root: str) -> str:
    return hashlib.sha256(root.encode()).hexdigest()[:8]


def _is_image(filename: str) -> bool:
    return not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: str) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def _images_under(class_dir: str) -> List[Tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file under ``class_dir``, sorted by path."""
    out = []
    for parent, dirs, names in os.walk(class_dir, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if _is_image(n):
                path = os.path.join(parent, n)
                st = os.stat(path)
                out.append((path, st.st_size, st.st_mtime_ns))
    return sorted(out)


def scan(name: str) -> FolderScan:
    """Check the layout of ``folder:DIR`` and list its images; a :class:`FolderError` otherwise."""
    root = folder_root(name)
    if not os.path.isdir(root):
        raise FolderError(f"{name}: {root} is not a directory")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FolderError(f"{root} has no train/ folder: put the training images in "
                          f"{train_dir}/<class>/ and the evaluation images in {root}/val/<class>/")
    eval_split = next((s for s in EVAL_SPLITS if os.path.isdir(os.path.join(root, s))), None)
    if eval_split is None:
        raise FolderError(f"{root} has no evaluation split: add {root}/val/<class>/ (or "
                          "validation/ or test/) with the same class folders as train/")
    splits = ("train", eval_split)
    classes = {s: _class_dirs(os.path.join(root, s)) for s in splits}
    if not classes["train"]:
        loose = [n for n in os.listdir(train_dir) if _is_image(n)]
        where = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise FolderError(f"{train_dir} has no class folders{where}: put each class's images in "
                          f"{train_dir}/<class>/")
    if len(classes["train"]) == 1:
        raise FolderError(f"{root} has a single class ({classes['train'][0]!r}): a classifier "
                          "needs at least two class folders in train/")
    for a, b in (splits, splits[::-1]):
        only = sorted(set(classes[a]) - set(classes[b]))
        if only:
            raise FolderError(f"class folder {only[0]!r} is in {root}/{a}/ but not in {root}/{b}/: "
                              "both splits need the same class folders")
    class_names = tuple(classes["train"])
    files: Dict[str, Tuple[Tuple[str, int], ...]] = {}
    digest = hashlib.sha256()
    for split in splits:
        entries = []
        for label, cls in enumerate(class_names):
            images = _images_under(os.path.join(root, split, cls))
            if not images:
                raise FolderError(f"{root}/{split}/{cls} holds no images (one of "
                                  f"{', '.join(IMAGE_EXTENSIONS)}): add some or remove the class "
                                  "from every split")
            for path, size, mtime in images:
                rel = os.path.relpath(path, root)
                entries.append((rel, label))
                digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
        files[split] = tuple(entries)
    return FolderScan(root, eval_split, class_names, files, digest.hexdigest())


def encode_rgb_jpeg(path: str) -> bytes:
    """The file's bytes if it is an RGB JPEG, else the image converted to RGB as a JPEG.

    Decodes the whole image either way, so a corrupt file raises here (OSError/ValueError).
    """
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a full decode: truncated or corrupt files fail now, not in training
        if image.format == "JPEG" and image.mode == "RGB":
            return data
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()


class FolderConfig(tfds.core.BuilderConfig):
    pass


class ImageFolderRecords(tfds.core.GeneratorBasedBuilder):
    """Images in class folders (train/ and val/, validation/ or test/), as TFRecords."""

    name = "cnn_jax_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, folder: FolderScan, **kwargs):
        self.folder = folder
        self.skipped: List[str] = []
        super().__init__(config=FolderConfig(name=folder.config_name,
                                             description=f"images of {folder.root}"), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Image folder {self.folder.root}",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(self.folder.class_names)),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(root=self.folder.root),
        )

    def _download_and_prepare(self, *args, **kwargs):
        result = super()._download_and_prepare(*args, **kwargs)
        self.info.metadata["skipped"] = list(self.skipped)  # written with the dataset info
        return result

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in self.folder.files}

    def _generate_examples(self, split: str) -> Iterator[Tuple[str, dict]]:
        for rel, label in self.folder.files[split]:
            try:
                image = encode_rgb_jpeg(os.path.join(self.folder.root, rel))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
                self.skipped.append(f"{rel} ({type(e).__name__})")
                continue
            yield rel, {"image": image, "label": label, "file_name": rel}


def make_builder(name: str, data_dir: str, folder: Optional[FolderScan] = None
                 ) -> ImageFolderRecords:
    return ImageFolderRecords(folder=folder or scan(name), data_dir=data_dir)


def prepare(name: str, data_dir: str, folder: Optional[FolderScan] = None) -> ImageFolderRecords:
    """Prepare (if the listing changed) and return the builder; prints a line when it prepares."""
    builder = make_builder(name, data_dir, folder)
    if builder.is_prepared():
        return builder
    builder.download_and_prepare(file_format="tfrecord")
    counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in builder.folder.files)
    line = (f"prepared {name} into {builder.data_dir}: {counts} images, "
            f"{len(builder.folder.class_names)} classes")
    if builder.skipped:
        shown = "; ".join(builder.skipped[:3]) + ("; ..." if len(builder.skipped) > 3 else "")
        line += f"; skipped {len(builder.skipped)} unreadable file(s): {shown}"
    stale = _earlier_preparations(builder)
    if stale:
        line += (f"; earlier preparation(s) of this folder, to delete when no run reads them: "
                 f"{', '.join(stale)}")
    print(line, flush=True)
    return make_builder(name, data_dir, builder.folder)


def _earlier_preparations(builder: ImageFolderRecords) -> List[str]:
    """Directories of other listings of the same folder path."""
    base = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))  # .../<builder name>
    prefix = builder.folder.config_name[:-12]
    return sorted(e.path for e in os.scandir(base)
                  if e.is_dir() and e.name.startswith(prefix)
                  and e.name != builder.folder.config_name)
