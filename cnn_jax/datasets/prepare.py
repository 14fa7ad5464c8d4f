"""Prepare a dataset into a TFDS data_dir, offline.

  python -m cnn_jax.datasets.prepare --dataset=shapes --data_dir=~/tensorflow_datasets
  python -m cnn_jax.datasets.prepare --dataset=shapes --image_size=224
  python -m cnn_jax.datasets.prepare --dataset=shapes/32px_n2000_v500
  python -m cnn_jax.datasets.prepare --dataset=imagenet2012 --data_dir=/data/tfds
      (needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/)
  python -m cnn_jax.datasets.prepare --dataset=folder:~/pets   (train/<class>/, val/<class>/)

``--data_dir`` defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets. cifar10, cifar100 and
imagenette are only checked: they must already be prepared (this project never downloads).
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional, Sequence


def define_flags(fv, argv: List[str]) -> None:
    from absl import flags

    del argv
    flags.DEFINE_string("dataset", "shapes", "dataset name, optionally name/config",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "shapes: pick the config for this training "
                         "resolution (32, 64 (default) or 224)", flag_values=fv)


def run(fv) -> int:
    from cnn_jax.validation import check_dir
    from cnn_jax.datasets import sources  # TensorFlow import: after the flags

    if fv.data_dir:
        check_dir("--data_dir", fv.data_dir)
    start = time.time()
    sources.prepare(fv.dataset, fv.data_dir, fv.image_size)  # DatasetNotFoundError: a ValueError
    if sources.split_name(fv.dataset)[0] != "fake":
        builder = sources.get_builder(fv.dataset, fv.data_dir, fv.image_size)
        splits = ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items())
        print(f"{builder.info.full_name} ready in {builder.data_dir} ({splits}); "
              f"{time.time() - start:.1f}s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cnn_jax import cli

    return cli.run_command("cnn_jax.datasets.prepare", define_flags, run, argv)


if __name__ == "__main__":
    sys.exit(main())
