"""Input pipeline throughput: JPEG decode + random-resized crop + flip + normalize + batching.

  python -m cnn_jax.benchmark_input                       # synthetic ImageNet-like JPEGs in memory
  python -m cnn_jax.benchmark_input --augment=vgg --dtype=bfloat16
  python -m cnn_jax.benchmark_input --dataset=imagenet2012 --data_dir=/data/tfds   # with file I/O

The synthetic mode encodes ``--num_images`` distinct 1/f-noise images (ImageNet's typical 500x375,
quality 90, ~100 KB like an average ImageNet JPEG) and streams them through the same
``input_pipeline.train_dataset_from_records`` the training iterator uses, so it measures the CPU
cost of preprocessing without disk reads. ``--dataset`` times ``create_train_iterator`` itself.
"""

from __future__ import annotations

import io
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np


def synthetic_jpegs(num_images: int, width: int, height: int, seed: int = 0) -> list:
    """Distinct natural-looking JPEGs: 1/f noise (several octaves) plus sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_images):
        image = np.zeros((height, width, 3), np.float32)
        for octave in range(2, 9):  # 4 .. 256 cells across, amplitude falling with frequency
            cells = 2 ** octave
            small = rng.normal(0, 1, (max(cells * height // width, 2), cells, 3)).astype(np.float32)
            for c in range(3):
                layer = Image.fromarray(small[..., c]).resize((width, height), Image.BICUBIC)
                image[..., c] += np.asarray(layer) * (45.0 / 2 ** ((octave - 2) * 0.2))
        image += rng.normal(0, 10, image.shape).astype(np.float32)
        image = np.clip(image + 128 + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _time(iterator, num_batches: int, warmup: int, batch_size: int) -> tuple:
    """(images per wall-clock second, images per CPU-second of this process)."""
    for _ in range(warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(iterator)
    batch["image"].sum()  # make sure the last batch is really there
    images = num_batches * batch_size
    return (images / (time.perf_counter() - start),
            images / max(time.process_time() - cpu_start, 1e-9))


def run_benchmark(batch_size: int = 256, image_size: int = 224, num_batches: int = 20,
                  warmup: int = 3, augment: Optional[str] = None, dtype: str = "float32",
                  source_size: str = "500x375", num_images: int = 64,
                  dataset: Optional[str] = None, data_dir: Optional[str] = None) -> Dict:
    """Returns images/second and what was measured."""
    import tensorflow as tf

    from cnn_jax import input_pipeline, preprocessing

    layout = dict(num_local_devices=1, process_index=0, process_count=1)
    if dataset:
        it = input_pipeline.create_train_iterator(dataset, data_dir, batch_size, image_size,
                                                  dtype=dtype, augment=augment, **layout)
        what = f"{dataset} records from {data_dir or 'the default data_dir'}"
    else:
        width, height = (int(v) for v in source_size.lower().split("x"))
        jpegs = synthetic_jpegs(num_images, width, height)
        what = (f"{num_images} synthetic {width}x{height} JPEGs in memory (mean "
                f"{np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB)")
        records = tf.data.Dataset.zip(tf.data.Dataset.range(2**62),
                                      tf.data.Dataset.from_tensor_slices(jpegs).repeat())
        ds = input_pipeline.train_dataset_from_records(
            records, lambda image: (image, tf.constant(0, tf.int32)), per_process_batch=batch_size,
            num_devices=1, image_size=image_size, seed_root=tf.constant([0, 0], tf.int64),
            jpeg=True, augment=preprocessing.parse_augment(augment),
            mean=preprocessing.IMAGENET_MEAN, std=preprocessing.IMAGENET_STD, dtype=dtype)
        it = ds.as_numpy_iterator()
    rate, cpu_rate = _time(it, num_batches, warmup, batch_size)
    return dict(images_per_second=rate, images_per_cpu_second=cpu_rate, cores=os.cpu_count(),
                what=what, batch_size=batch_size, image_size=image_size, dtype=dtype,
                augment=augment or "inception")


def define_flags(fv, argv) -> None:
    from absl import flags

    from cnn_jax.validation import DTYPES

    del argv
    flags.DEFINE_integer("batch_size", 256, "global batch (one device)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("image_size", 224, "output resolution", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("num_batches", 20, "timed batches", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "untimed batches first", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("augment", None, "preset or field=value items (default: Inception "
                        "random-resized crop + flip)", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "output dtype", flag_values=fv)
    flags.DEFINE_string("source_size", "500x375", "synthetic JPEG WIDTHxHEIGHT", flag_values=fv)
    flags.DEFINE_integer("num_images", 64, "distinct synthetic JPEGs", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("dataset", None, "time create_train_iterator on this prepared dataset "
                        "instead of synthetic JPEGs", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir for --dataset", flag_values=fv)


def run(fv) -> int:
    r = run_benchmark(fv.batch_size, fv.image_size, fv.num_batches, fv.warmup, fv.augment,
                      fv.dtype, fv.source_size, fv.num_images, fv.dataset, fv.data_dir)
    # Images per CPU-second is what one core sustains; it stays meaningful on a busy machine.
    print(f"input pipeline: {r['images_per_second']:.0f} images/s on {r['cores']} CPU cores "
          f"({r['images_per_cpu_second']:.0f} images per CPU-second); "
          f"decode + {r['augment']} crop + flip + normalize + batch {r['batch_size']} of "
          f"{r['image_size']}x{r['image_size']} {r['dtype']} from {r['what']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cnn_jax import cli

    return cli.run_command("cnn_jax.benchmark_input", define_flags, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
