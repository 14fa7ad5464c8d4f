"""Evaluate a checkpoint: ``python -m cnn_jax.evaluate --arch=resnet18 --workdir=workdir/resnet18``.

Reports top-1, top-5 and the cross-entropy of the latest (or ``--checkpoint=best`` / a step)
checkpoint on the evaluation split of the dataset it was trained on; the model, image size and
dataset come from the config stored with the checkpoint.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags  # noqa: E402

from cnn_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Architecture the checkpoint must hold, e.g. resnet18.")
flags.DEFINE_string("workdir", None, "Workdir of a training run (default ./workdir/<arch>).")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val top-1) or a step number.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir, if not the one used for training.")
flags.DEFINE_integer("batch_size", 0, "Global eval batch (default: the training config's).")
flags.DEFINE_string("parallel", None, "pmap or shard_map (default: the training config's).")


def evaluate_checkpoint(workdir: str, arch: str, checkpoint: str = "latest",
                        data_dir: str = None, batch_size: int = 0, parallel_mode: str = None):
    """(metrics, step, config) of a checkpoint in ``workdir``: top-1/top-5/loss on the eval split."""
    import functools

    import ml_collections

    from cnn_jax import checkpoint as ckpt_lib, convert, input_pipeline, parallel, train_lib
    from cnn_jax import train_step as step_lib

    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        if checkpoint == "latest":
            step = checkpointer.latest_step()
        elif checkpoint == "best":
            step = checkpointer.best_step()
        elif checkpoint.isdigit():
            step = int(checkpoint)
            if step not in checkpointer.all_steps():
                raise ValueError(f"no checkpoint at step {step} in {checkpointer.directory}; "
                                 f"there are {checkpointer.all_steps()}")
        else:
            raise ValueError(f"--checkpoint must be 'latest', 'best' or a step, got {checkpoint!r}")
        if step is None:
            raise ValueError(f"no checkpoint in {checkpointer.directory}: train first with "
                             f"`python -m cnn_jax.train --arch={arch} --workdir={workdir}`")
        meta = checkpointer.read_meta(step)
        if arch and meta.get("arch") != arch:
            raise ckpt_lib.CheckpointMismatchError(
                f"{checkpointer.directory} holds a checkpoint of arch={meta.get('arch')!r}, "
                f"not {arch!r}")
        config = ml_collections.ConfigDict(meta["config"])
        if data_dir:
            config.data_dir = data_dir
        if batch_size:
            config.eval_batch_size = batch_size
        if parallel_mode:
            config.parallel = parallel_mode
        dp = parallel.DataParallel(config.parallel)
        info = input_pipeline.get_dataset_info(config.dataset, config.data_dir or None,
                                               image_size=config.image_size)
        setup = train_lib.create_setup(config, info)
        if convert.is_converted(meta):  # imported weights: no optimizer state to restore
            _, variables, _ = convert.load_converted(workdir)
            host_state = setup.host_state.replace(
                params=variables["params"], batch_stats=variables.get("batch_stats", {}))
        else:
            host_state, _, step = checkpointer.restore(setup.host_state, step)
    finally:
        checkpointer.close()

    eval_step = dp.map(functools.partial(step_lib.eval_step, axis_name=dp.axis_name))
    metrics = train_lib.evaluate(eval_step, dp.replicate(host_state), dp, config)
    return metrics, step, config


def main(argv):
    cli.setup(argv)
    with cli.one_line_errors():
        if not FLAGS.arch:
            raise ValueError("pass --arch=<name> (the architecture of the checkpoint)")
        workdir = FLAGS.workdir or os.path.join("workdir", FLAGS.arch)
        metrics, step, config = evaluate_checkpoint(workdir, FLAGS.arch, FLAGS.checkpoint,
                                                    FLAGS.data_dir, FLAGS.batch_size,
                                                    FLAGS.parallel)
    print(f"{config.arch} step {step} on {config.dataset} eval split ({metrics['count']} images, "
          f"{config.image_size}px): top-1 {100 * metrics['top1']:.2f}%, "
          f"top-5 {100 * metrics['top5']:.2f}%, loss {metrics['loss']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
