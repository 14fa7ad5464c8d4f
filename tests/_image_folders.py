"""Small image folders (the ImageFolder layout) of real encoded files, made by the tests."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "triangle")
# (extension, PIL mode, PIL format): every format and mode the folder builder converts.
FORMATS = (("jpg", "RGB", "JPEG"), ("png", "RGBA", "PNG"), ("gif", "P", "GIF"),
           ("bmp", "L", "BMP"), ("webp", "RGB", "WEBP"), ("jpeg", "CMYK", "JPEG"),
           ("PNG", "LA", "PNG"))


def pixels(label: int, index: int, height: int, width: int) -> np.ndarray:
    """A class-coloured noisy image: class c is mostly channel c, so a tiny net can learn it."""
    rng = np.random.default_rng([label, index])
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    image[..., label % 3] += 150
    return image


def write_image(path: str, array: np.ndarray, mode: str = "RGB", fmt: str = "PNG") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).convert(mode).save(path, format=fmt)


def make_folder(root: str, n_train: int = 7, n_val: int = 3, classes: Sequence[str] = CLASSES,
                eval_split: str = "val") -> str:
    """``root/train/<class>/`` and ``root/<eval_split>/<class>/`` with mixed formats and sizes."""
    for split, n in (("train", n_train), (eval_split, n_val)):
        for c, cls in enumerate(classes):
            for i in range(n):
                ext, mode, fmt = FORMATS[(i + c) % len(FORMATS)]
                array = pixels(c, i + (1000 if split != "train" else 0), 18 + 3 * i, 20 + 2 * c)
                write_image(os.path.join(root, split, cls, f"{split}_{i}.{ext}"), array, mode, fmt)
    return root
