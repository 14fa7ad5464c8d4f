"""Classify images with converted ImageNet weights: the top-5 classes and their names.

    python -m cnn_jax.predict --arch=resnet50 --checkpoint=DIR image.jpg [more.jpg ...]

``DIR`` is written by ``python -m cnn_jax.convert``. Images get the evaluation preprocessing of
:mod:`cnn_jax.preprocessing` (centre crop of 87.5% of the shorter side resized to 224, ImageNet
mean/std), the same as ``cnn_jax.evaluate``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines are noise

import numpy as np  # noqa: E402

_JPEG_MAGIC = b"\xff\xd8\xff"


def load_image(path: str, image_size: int) -> np.ndarray:
    """``path`` (JPEG, PNG, GIF, BMP or WebP) as a normalized [size, size, 3] float32 array."""
    import tensorflow as tf

    from cnn_jax import preprocessing

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image at {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = preprocessing.preprocess_for_eval(tf.constant(data), image_size,
                                                  jpeg=data.startswith(_JPEG_MAGIC))
    except tf.errors.InvalidArgumentError:
        raise ValueError(f"{path} is not an image file TensorFlow can decode (JPEG, PNG, GIF, BMP "
                         "or WebP)") from None
    return image.numpy()


def top_k(logits: np.ndarray, k: int = 5) -> List[Tuple[int, float]]:
    """``k`` (class index, softmax probability) pairs, most probable first."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


def class_name(index: int, num_classes: int) -> str:
    if num_classes == 1000:
        from cnn_jax import imagenet_classes
        return imagenet_classes.class_names()[index]
    return f"class {index}"


def predict(checkpoint: str, images: Sequence[str], arch: str = None, k: int = 5
            ) -> List[List[Tuple[int, float, str]]]:
    """Per image, the top-``k`` ``(class index, probability, name)`` of a converted checkpoint."""
    import jax

    from cnn_jax import convert

    model, variables, meta = convert.load_converted(checkpoint)
    if arch and arch != meta["arch"]:
        raise ValueError(f"{checkpoint} holds {meta['arch']!r} weights, not {arch!r}: pass "
                         f"--arch={meta['arch']}")
    batch = np.stack([load_image(p, int(meta.get("image_size", 224))) for p in images])
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch))
    n = logits.shape[-1]
    return [[(i, p, class_name(i, n)) for i, p in top_k(row, k)] for row in logits]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnn_jax.predict",
        description="Top-5 ImageNet classes of images, with weights from cnn_jax.convert.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="directory written by cnn_jax.convert")
    parser.add_argument("--arch", default=None,
                        help="architecture (checked against the checkpoint's)")
    parser.add_argument("--top_k", type=int, default=5, help="classes to print per image")
    args = parser.parse_args(argv)
    try:
        results = predict(args.checkpoint, args.images, args.arch, args.top_k)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    for path, rows in zip(args.images, results):
        print(path)
        for rank, (index, prob, name) in enumerate(rows, start=1):
            print(f"  {rank}. {100 * prob:6.2f}%  {name}  (class {index})")
    return 0


if __name__ == "__main__":
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # Orbax's notes on checkpoint options are noise here
    sys.exit(main())
