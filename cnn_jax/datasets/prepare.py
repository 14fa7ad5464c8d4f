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

import argparse
import sys
import time
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn_jax.datasets.prepare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="shapes", help="dataset name, optionally name/config")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: $TFDS_DATA_DIR "
                        "or ~/tensorflow_datasets)")
    parser.add_argument("--image_size", type=int, default=None, help="shapes: pick the config for "
                        "this training resolution (32, 64 (default) or 224)")
    args = parser.parse_args(argv)

    from cnn_jax.datasets import sources  # TensorFlow import: after --help

    start = time.time()
    try:
        sources.prepare(args.dataset, args.data_dir, args.image_size)
        if sources.split_name(args.dataset)[0] != "fake":
            builder = sources.get_builder(args.dataset, args.data_dir, args.image_size)
            splits = ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items())
            print(f"{builder.info.full_name} ready in {builder.data_dir} ({splits}); "
                  f"{time.time() - start:.1f}s")
    except ValueError as e:  # DatasetNotFoundError and bad names: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
