"""Export a workdir's model for serving: StableHLO through ``jax.export``, or a TF SavedModel.

    python -m cnn_jax.export --workdir=DIR --format=stablehlo --output=OUT [--checkpoint=best]
    python -m cnn_jax.export --workdir=DIR --format=saved_model --output=OUT

Both take a float32 batch ``[batch, image_size, image_size, 3]`` (NHWC, already normalized with the
``mean``/``std`` in ``OUT/cnn_jax_meta.json``) and return float32 logits ``[batch, classes]``; the
batch dimension is symbolic, so any batch size runs without re-exporting, and the computation is
lowered for CPU, CUDA and TPU (``--platforms``), whatever machine exports it.
``cnn_jax_meta.json`` also holds the architecture, image size, centre-crop ratio and class names.

- ``stablehlo``: ``OUT/model.jax_exported`` is ``jax.export``'s serialization (weights embedded as
  constants): ``jax.export.deserialize(open(p, 'rb').read()).call(images)``; ``OUT/model.mlir`` is
  the StableHLO text.
- ``saved_model``: a TensorFlow SavedModel through ``jax2tf`` with the weights as ``tf.Variable``s:
  ``tf.saved_model.load(OUT).serve(images)`` or the ``serving_default`` signature.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from absl import app, flags

from cnn_jax import cli

cli.quiet_tensorflow_env("2")  # before anything imports TensorFlow

FORMATS = ("stablehlo", "saved_model")
# Lowered for all three, so an export made on a CPU machine serves on GPU/TPU and vice versa.
PLATFORMS = ("cpu", "cuda", "tpu")
META_FILE = "cnn_jax_meta.json"
FLAGS = flags.FLAGS


def export_meta(loaded: Any) -> Dict[str, Any]:
    return {"arch": loaded.meta["arch"], "step": loaded.step, "image_size": loaded.image_size,
            "num_classes": len(loaded.class_names), "class_names": list(loaded.class_names),
            "mean": list(loaded.mean), "std": list(loaded.std),
            "eval_crop_ratio": loaded.eval_crop_ratio,
            "input": "float32 [batch, image_size, image_size, 3] NHWC, (rgb / 255 - mean) / std",
            "output": "float32 logits [batch, num_classes]"}


def _check_output(output: str) -> str:
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"{output} already exists and is not an empty directory: pass a new "
                         "--output")
    return output


def export_stablehlo(loaded: Any, output: str, platforms=PLATFORMS) -> str:
    """``jax.export`` with a symbolic batch dimension; returns the serialized file's path."""
    import jax
    import jax.numpy as jnp

    model, variables = loaded.model, loaded.variables
    s = loaded.image_size

    def logits(images):
        return model.apply(variables, images, train=False).astype(jnp.float32)

    batch, = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(logits), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32))
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "model.jax_exported")
    with open(path, "wb") as f:
        f.write(exported.serialize())
    with open(os.path.join(output, "model.mlir"), "w") as f:
        f.write(exported.mlir_module())
    return path


def export_saved_model(loaded: Any, output: str, platforms=PLATFORMS) -> str:
    """A TF SavedModel (``jax2tf``, symbolic batch, weights as variables); returns its path."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    from jax.experimental import jax2tf

    model = loaded.model
    s = loaded.image_size

    def logits(variables, images):
        return model.apply(variables, images, train=False).astype(jnp.float32)

    to_tf = jax2tf.convert(logits, polymorphic_shapes=[None, f"(b, {s}, {s}, 3)"],
                           with_gradient=False, native_serialization_platforms=tuple(platforms))
    module = tf.Module()
    module.variables_tree = tf.nest.map_structure(
        lambda x: tf.Variable(x, trainable=False), jax.tree_util.tree_map(
            lambda x: tf.convert_to_tensor(jax.device_get(x)), loaded.variables))
    module.serve = tf.function(lambda images: to_tf(module.variables_tree, images),
                               input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32,
                                                              name="images")],
                               autograph=False)
    tf.saved_model.save(module, output, signatures={"serving_default": module.serve})
    return output


def export(workdir: str, output: str, fmt: str = "stablehlo", checkpoint: str = "latest",
           platforms=PLATFORMS, ema: bool = False) -> str:
    """Export ``workdir``'s checkpoint as ``fmt`` into the new directory ``output``."""
    from cnn_jax import loading

    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    platforms = tuple(platforms)
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ValueError(f"--platforms must be some of {','.join(PLATFORMS)}, got "
                         f"{','.join(platforms)}")
    output = _check_output(output)
    loaded = loading.load(workdir, checkpoint, ema=ema)
    path = (export_stablehlo if fmt == "stablehlo" else export_saved_model)(loaded, output,
                                                                            platforms)
    with open(os.path.join(output, META_FILE), "w") as f:
        json.dump({**export_meta(loaded), "platforms": list(platforms)}, f, indent=1)
    return path


def define_flags() -> None:
    """The command's flags (defined only when it runs, so that other commands can import this)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run or of cnn_jax.convert.")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val top-1) or a step.")
    flags.DEFINE_enum("format", "stablehlo", list(FORMATS), "What to write.")
    flags.DEFINE_string("output", None, "New (or empty) directory to write.")
    flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms to lower for.")
    flags.DEFINE_bool("ema", False, "Export the EMA of the weights (--config.ema_decay).")


def main(argv):
    cli.setup(argv)
    with cli.one_line_errors():
        if not FLAGS.workdir or not FLAGS.output:
            raise ValueError("pass --workdir=DIR (a training run's or cnn_jax.convert's output) "
                             "and --output=OUT")
        path = export(FLAGS.workdir, FLAGS.output, FLAGS.format, FLAGS.checkpoint,
                      FLAGS.platforms, FLAGS.ema)
    print(f"exported {FLAGS.workdir} ({FLAGS.format}, batch dimension symbolic) -> {path}",
          flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
