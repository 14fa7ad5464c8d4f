"""Evaluate a checkpoint: ``python -m cnn_jax.evaluate --workdir=workdir/resnet18``.

Reports top-1, top-5 and the cross-entropy of the latest (or ``--checkpoint=best`` / a step)
checkpoint of a training run or of ``cnn_jax.convert`` on the evaluation split of the dataset it
was trained on; the model, image size and dataset come from the config stored with the checkpoint.
``--protocol=ten_crop|multiscale`` evaluates with the papers' test-time protocols
(:mod:`cnn_jax.protocols`) instead of one centre crop.
"""

import os

from absl import app, flags

from cnn_jax import cli

cli.quiet_tensorflow_env("1")  # before anything imports TensorFlow

FLAGS = flags.FLAGS


def evaluate_checkpoint(workdir: str, arch: str = None, checkpoint: str = "latest",
                        data_dir: str = None, batch_size: int = 0, parallel_mode: str = None,
                        protocol: str = "center", ema: bool = False):
    """(metrics, step, config) of ``workdir``'s checkpoint: top-1/top-5/loss on the eval split."""
    from cnn_jax import loading, protocols

    if protocol not in protocols.PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of "
                         f"{', '.join(protocols.PROTOCOLS)}")
    loaded = loading.load(workdir, checkpoint, arch, dtype=None, ema=ema)
    config = loaded.config
    if data_dir:
        config.data_dir = data_dir
    if batch_size:
        config.eval_batch_size = batch_size
    if parallel_mode:
        config.parallel = parallel_mode
    metrics = protocols.evaluate(loaded.model, loaded.variables, config, protocol)
    return metrics, loaded.step, config


def define_flags() -> None:
    """The command's flags (defined only when it runs, so that other commands can import this)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run or of cnn_jax.convert "
                        "(default ./workdir/<arch>).")
    flags.DEFINE_string("arch", None, "Architecture the checkpoint must hold (optional check).")
    flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val top-1) or a step number.")
    flags.DEFINE_enum("protocol", "center", ["center", "ten_crop", "multiscale"],
                      "Test-time protocol: one centre crop, AlexNet's 10 crops, or VGG's dense "
                      "evaluation at 3 scales with flips.")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir, if not the one used for training.")
    flags.DEFINE_integer("batch_size", 0, "Global eval batch (default: the training config's).")
    flags.DEFINE_string("parallel", None, "pmap or shard_map (default: the training config's).")
    flags.DEFINE_bool("ema", False, "Evaluate the EMA of the weights (--config.ema_decay).")


def main(argv):
    cli.setup(argv)
    cli.import_tensorflow_quietly()  # the command reads its data through TensorFlow
    with cli.one_line_errors():
        if not FLAGS.workdir and not FLAGS.arch:
            raise ValueError("pass --workdir=DIR (a training run's or cnn_jax.convert's output)")
        workdir = FLAGS.workdir or os.path.join("workdir", FLAGS.arch)
        metrics, step, config = evaluate_checkpoint(workdir, FLAGS.arch, FLAGS.checkpoint,
                                                    FLAGS.data_dir, FLAGS.batch_size,
                                                    FLAGS.parallel, FLAGS.protocol, FLAGS.ema)
    protocol = ("" if FLAGS.protocol == "center" else f", {FLAGS.protocol}") + (
        ", EMA weights" if FLAGS.ema else "")
    print(f"{config.arch} step {step} on {config.dataset} eval split ({metrics['count']} images, "
          f"{config.image_size}px{protocol}): top-1 {100 * metrics['top1']:.2f}%, "
          f"top-5 {100 * metrics['top5']:.2f}%, loss {metrics['loss']:.4f}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
