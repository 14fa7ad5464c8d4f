"""The 1000 ImageNet-1k (ILSVRC 2012) class names, read from files tensorflow_datasets ships.

Index i is torchvision's (and TFDS's) class i: classes sorted by WordNet id. The names are the
WordNet synonyms list that TFDS keeps in ``datasets/siscore/labels.py``; the WordNet ids come from
``datasets/imagenet2012/labels.txt``. Both are parsed as text, so TensorFlow is never imported.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
from typing import Tuple

NUM_CLASSES = 1000


def _tfds_file(*parts: str) -> str:
    spec = importlib.util.find_spec("tensorflow_datasets")  # locates without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ImageNet class names come with tensorflow_datasets: "
                                "pip install tensorflow-datasets")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the installed tensorflow_datasets does not "
                                "ship the ImageNet label files (use tensorflow-datasets 4.9.x)")
    return path


@functools.lru_cache(maxsize=None)
def class_names() -> Tuple[str, ...]:
    """Names by class index, e.g. ``class_names()[0] == 'tench, Tinca tinca'``."""
    path = _tfds_file("datasets", "siscore", "labels.py")
    with open(path, encoding="utf-8") as f:
        module = ast.parse(f.read())
    for node in module.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "IMAGENET_LABELS_LIST"):
            names = tuple(ast.literal_eval(node.value))
            if len(names) == NUM_CLASSES:
                return names
    raise ValueError(f"{path} holds no list of {NUM_CLASSES} ImageNet names (IMAGENET_LABELS_LIST)")


@functools.lru_cache(maxsize=None)
def synsets() -> Tuple[str, ...]:
    """WordNet ids by class index, e.g. ``synsets()[0] == 'n01440764'``."""
    with open(_tfds_file("datasets", "imagenet2012", "labels.txt"), encoding="utf-8") as f:
        ids = tuple(line.strip() for line in f if line.strip())
    if len(ids) != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} ImageNet WordNet ids, found {len(ids)}")
    return ids


def short_name(index: int) -> str:
    """The first synonym of class ``index``, e.g. ``'tench'``."""
    return class_names()[index].split(",")[0].strip()
