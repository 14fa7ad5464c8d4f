"""Classify images with the model of any workdir: a training run's or ``cnn_jax.convert``'s.

    python -m cnn_jax.predict --workdir=DIR [--checkpoint=best|latest|STEP] IMAGE [IMAGE ...]
        [--top_k=5] [--format=text|json] [--batch_size=32]

The model, image size, normalization, centre-crop ratio and class names (the dataset's, e.g. the
folder names or ImageNet's) come from what the checkpoint stored. Images (JPEG, PNG, GIF, BMP or
WebP) get the evaluation preprocessing of :mod:`cnn_jax.preprocessing`, the same as
``cnn_jax.evaluate``, and run in batches of ``--batch_size`` (one compilation: the last batch is
padded).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np
from absl import app, flags

from cnn_jax import cli

cli.quiet_tensorflow_env("2")  # TensorFlow's C++ INFO/WARNING lines are noise

_JPEG_MAGIC = b"\xff\xd8\xff"
FLAGS = flags.FLAGS


def load_image(path: str, image_size: int, crop_ratio: float = 0.875, mean=None, std=None
               ) -> np.ndarray:
    """``path`` (JPEG, PNG, GIF, BMP or WebP) as a normalized [size, size, 3] float32 array."""
    import tensorflow as tf

    from cnn_jax import preprocessing

    if not os.path.isfile(path):
        raise ValueError(f"no image file at {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = preprocessing.preprocess_for_eval(
            tf.constant(data), image_size, jpeg=data.startswith(_JPEG_MAGIC),
            crop_ratio=crop_ratio, mean=mean or preprocessing.IMAGENET_MEAN,
            std=std or preprocessing.IMAGENET_STD)
    except tf.errors.InvalidArgumentError:
        raise ValueError(f"{path} is not an image file TensorFlow can decode (JPEG, PNG, GIF, BMP "
                         "or WebP)") from None
    return image.numpy()


def predict(workdir: str, images: Sequence[str], checkpoint: str = "latest", k: int = 5,
            batch_size: int = 32, arch: str = None, ema: bool = False) -> Dict[str, Any]:
    """Top-``k`` classes of each image: ``{'arch', 'step', 'workdir', 'results': [{'image',
    'predictions': [{'rank', 'index', 'name', 'probability'}]}]}``."""
    import jax

    from cnn_jax import loading

    if not images:
        raise ValueError("pass one or more image files after the flags")
    if k < 1 or batch_size < 1:
        raise ValueError(f"--top_k and --batch_size must be positive, got {k} and {batch_size}")
    loaded = loading.load(workdir, checkpoint, arch, ema=ema)
    model, variables = loaded.model, loaded.variables
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False).astype("float32")))
    batch_size = min(batch_size, len(images))
    results: List[Dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        paths = list(images[start:start + batch_size])
        batch = np.stack([load_image(p, loaded.image_size, loaded.eval_crop_ratio, loaded.mean,
                                     loaded.std) for p in paths])
        padded = np.zeros((batch_size,) + batch.shape[1:], np.float32)  # one compiled shape
        padded[:len(paths)] = batch
        probs = np.asarray(apply(variables, padded))[:len(paths)]
        for path, row in zip(paths, probs):
            results.append({"image": path, "predictions": [
                {"rank": r, "index": i, "name": loaded.class_names[i], "probability": p}
                for r, (i, p) in enumerate(loading.top_k(row, k), start=1)]})
    return {"arch": loaded.meta["arch"], "step": loaded.step,
            "workdir": os.path.abspath(workdir), "results": results}


def format_text(output: Dict[str, Any]) -> str:
    lines = []
    for result in output["results"]:
        lines.append(result["image"])
        for p in result["predictions"]:
            lines.append(f"  {p['rank']}. {100 * p['probability']:6.2f}%  {p['name']}")
    return "\n".join(lines)


def define_flags() -> None:
    """The command's flags (defined only when it runs, so that other commands can import this)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run or of cnn_jax.convert.")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val top-1) or a step.")
    flags.DEFINE_string("arch", None, "Architecture the checkpoint must hold (optional check).")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
    flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
    flags.DEFINE_bool("ema", False, "Use the EMA of the weights (--config.ema_decay).")


def main(argv):
    cli.setup(argv[:1])  # the positional arguments are the images
    cli.import_tensorflow_quietly()  # the images are decoded by TensorFlow
    with cli.one_line_errors():
        workdir, checkpoint = FLAGS.workdir, FLAGS.checkpoint
        if not workdir and checkpoint and os.path.isdir(checkpoint):
            workdir, checkpoint = checkpoint, "latest"  # the earlier `--checkpoint=DIR` form
        if not workdir:
            raise ValueError("pass --workdir=DIR (a training run's or cnn_jax.convert's output)")
        output = predict(workdir, argv[1:], checkpoint, FLAGS.top_k, FLAGS.batch_size,
                         FLAGS.arch, FLAGS.ema)
    print(json.dumps(output) if FLAGS.format == "json" else format_text(output), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
