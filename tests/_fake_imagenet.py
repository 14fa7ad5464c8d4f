"""A tiny fake ILSVRC2012 download: the two tars the real TFDS `imagenet2012` builder reads.

Each image is a solid colour that identifies where it came from (its synset for train, its file for
validation), so the label a pipeline returns can be checked from the pixels alone, whatever the
order, crop or flip.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

Colour = Tuple[int, int, int]
# Far-apart colours, so a JPEG-compressed, resized crop is still matched to the right one.
COLOURS: List[Colour] = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20),
                         (20, 230, 230), (230, 20, 230), (128, 128, 128)]
# Synsets at both ends of the sorted list, so a wrong label mapping cannot go unnoticed.
TRAIN_SYNSETS = ("n01440764", "n01443537", "n15075141")


def synset_names() -> List[str]:
    """TFDS's sorted list of the 1000 synsets: the train label is the index in it."""
    with open(imagenet_common.label_names_file()) as f:
        return f.read().split()


def validation_synsets(n: int) -> List[str]:
    """Synsets of ILSVRC2012_val_00000001 .. n from the label file shipped inside TFDS."""
    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    with open(os.fspath(path)) as f:
        return f.read().split()[:n]


def _jpeg(colour: Colour, size: Tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet(manual_dir: str, images_per_synset: int = 2, num_val: int = 4
                        ) -> Tuple[Dict[Colour, int], Dict[Colour, int]]:
    """Write both tars into ``manual_dir``; returns {colour: expected label} for train and val."""
    os.makedirs(manual_dir, exist_ok=True)
    names = synset_names()
    train_labels, val_labels = {}, {}
    sizes = [(80, 60), (50, 70), (64, 64)]
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for k, synset in enumerate(TRAIN_SYNSETS):
            colour = COLOURS[k]
            train_labels[colour] = names.index(synset)
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for i in range(images_per_synset):
                    _add(inner, f"{synset}_{10026 + i}.JPEG", _jpeg(colour, sizes[i % 3]))
            _add(outer, f"{synset}.tar", inner_buf.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for i, synset in enumerate(validation_synsets(num_val)):
            colour = COLOURS[len(TRAIN_SYNSETS) + i]
            val_labels[colour] = names.index(synset)
            _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(colour, sizes[i % 3]))
    return train_labels, val_labels
