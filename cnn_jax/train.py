"""Train a registered CNN: ``python -m cnn_jax.train --arch=resnet18``.

With no other flag it trains on the built-in ``shapes`` dataset (prepared on first use) with
``configs/default.py``; ``--dataset=imagenet2012 --data_dir=DIR`` picks the ImageNet recipe of the
architecture's family (``configs/imagenet_<family>.py``); ``--config=FILE`` any config file;
``--config.FIELD=VALUE`` overrides one field and ``--config.model.FIELD=VALUE`` sets a model option
(``--config.model.shortcut=C``); every field is checked before anything is written. Re-running the
same command resumes from the last checkpoint in ``--workdir``.
"""

import os
import sys

from cnn_jax import cli

cli.quiet_tensorflow(sys.argv)  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cnn_jax import configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Registered architecture, e.g. resnet18 (see cnn_jax.models).")
flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here (default ./workdir/<arch>).")
flags.DEFINE_string("dataset", None, "Dataset (default: the config's, `shapes`); imagenet2012 "
                    "selects the family's ImageNet recipe unless --config is given.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes ($JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process ($JAX_PROCESS_ID).")
# Unknown fields parse here and are reported by configs.validation with the valid names, as one
# line; model options (--config.model.FIELD) are only known once --arch is.
config_flags.DEFINE_config_file("config", configs.DEFAULT_CONFIG, "Training config file.",
                                lock_config=False, accept_new_attributes=True)


def resolve_config():
    """The config file for ``--arch`` (and ``--dataset``), with ``--config.*`` overrides on top."""
    path = config_flags.get_config_filename(FLAGS["config"])
    arch = FLAGS.arch or FLAGS.config.arch
    if FLAGS.dataset and not FLAGS["config"].present:
        path = configs.recipe_path(arch, FLAGS.dataset)
    config = configs.load(path, arch)
    configs.apply_overrides(config, config_flags.get_override_values(FLAGS["config"]))
    config.arch = arch or ""
    if FLAGS.dataset:
        config.dataset = FLAGS.dataset
    if FLAGS.data_dir:
        config.data_dir = FLAGS.data_dir
    return config


def main(argv):
    cli.setup(argv)
    from cnn_jax import parallel, train_lib  # after the flags: importing JAX is slow

    with cli.one_line_errors():
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        config = resolve_config()
        workdir = FLAGS.workdir or os.path.join("workdir", config.arch or "unnamed")
        train_lib.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
