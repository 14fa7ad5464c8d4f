"""Data-parallel input pipeline: TFDS records -> tf.data preprocessing -> per-device numpy batches.

Batches are dicts of numpy arrays shaped ``[D, B / (D * P), ...]`` (D local devices, P processes),
ready for ``jax.pmap`` (:class:`cnn_jax.parallel.DataParallel` puts them on the devices).

Training streams are infinite and exactly reproducible. Example ``k`` of a process's stream lies
in epoch ``e = k // n`` (n = examples in the process's shard); the epoch's file order and shuffle
buffer are seeded by ``(seed, process, e)`` and the example's augmentation by
``(seed, process, k)``, all with stateless ops. Resuming at ``start_step`` therefore starts
directly in the right epoch and only skips the raw (undecoded) records before
``start_step * B / P`` within it. Resuming requires the same seed, global batch size and process
count.

Evaluation reads each process's contiguous part of the split once, pads the last batch and marks
real examples with ``mask``, so every example is counted exactly once on any device/process count.

``data_dir=None`` means ``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn_jax import preprocessing
from cnn_jax.validation import DTYPES
from cnn_jax.datasets import sources
from cnn_jax.datasets.sources import DATASETS, DatasetNotFoundError  # noqa: F401 (re-exported)

# tf.data only needs the CPU; keep TensorFlow off any accelerator JAX is going to use.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialized
    pass

Batch = Dict[str, np.ndarray]

# `fake` pretends to be ImageNet-sized so that schedules computed from it look like ImageNet's.
FAKE_INFO = dict(num_classes=1000, num_train_examples=1_281_167, num_eval_examples=50_000)


class DatasetInfo(NamedTuple):
    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: Tuple[str, ...] = ()
    # The evaluation preprocessing, recorded in checkpoints for predict/export.
    mean: Tuple[float, ...] = preprocessing.IMAGENET_MEAN
    std: Tuple[float, ...] = preprocessing.IMAGENET_STD
    eval_crop_ratio: float = preprocessing.EVAL_CROP_RATIO

    def checkpoint_meta(self) -> Dict[str, Any]:
        """What a checkpoint stores so that inference needs no dataset: names, normalization."""
        return {"class_names": list(self.class_names), "mean": list(self.mean),
                "std": list(self.std), "eval_crop_ratio": float(self.eval_crop_ratio)}


def canonical_name(name: str) -> str:
    """The dataset name a checkpoint records (``folder:DIR`` with an absolute path)."""
    return sources.canonical_name(name)


def get_dataset_info(name: str, data_dir: Optional[str], image_size: Optional[int] = None
                     ) -> DatasetInfo:
    """Classes and split sizes of ``name``; ``image_size`` selects the `shapes` config.

    An unprepared `shapes` config is described without generating it; ``folder:DIR`` is prepared
    (once per listing); other unprepared datasets raise ``DatasetNotFoundError``.
    """
    base, config = sources.split_name(name)
    if base == "fake":
        return DatasetInfo(name, **FAKE_INFO)
    if base == "shapes":
        builder = sources.make_builder(name, data_dir, image_size)  # works unprepared
        if not builder.is_prepared():
            cfg = builder.builder_config
            return DatasetInfo(name, len(cfg.classes), cfg.num_train, cfg.num_validation,
                               tuple(cfg.classes))
    builder = sources.get_builder(name, data_dir, image_size, rescan=True)  # a run starts here
    spec = sources.spec(name, builder)
    label = builder.info.features[spec.label_key]
    return DatasetInfo(name, label.num_classes,
                       builder.info.splits[spec.train_split].num_examples,
                       builder.info.splits[spec.eval_split].num_examples,
                       tuple(label.names), tuple(spec.mean), tuple(spec.std),
                       spec.eval_crop_ratio)


def prepare_dataset(name: str, data_dir: Optional[str], image_size: Optional[int] = None) -> None:
    """Prepare ``name`` in ``data_dir`` (idempotent, offline).

    `shapes`: generated (config chosen by ``image_size``, default 64 px). `imagenet2012`: built
    from ``<data_dir>/downloads/manual/ILSVRC2012_img_{train,val}.tar``. `cifar10`, `cifar100`,
    `imagenette`: only checked, never downloaded. `fake`: nothing to do. Missing data raises
    ``DatasetNotFoundError`` saying what to put where.
    """
    sources.prepare(name, data_dir, image_size)


# ----------------------------------------------------------------------------- helpers


def _layout(global_batch_size: int, num_local_devices: Optional[int],
            process_index: Optional[int], process_count: Optional[int]
            ) -> Tuple[int, int, int, int]:
    """(local devices D, per-device batch, process index, process count), validated."""
    if num_local_devices is None or process_index is None or process_count is None:
        import jax  # only for the defaults: tests and tools pass the layout explicitly

        if num_local_devices is None:
            num_local_devices = jax.local_device_count()
        if process_index is None:
            process_index = jax.process_index()
        if process_count is None:
            process_count = jax.process_count()
    if num_local_devices < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad layout: num_local_devices={num_local_devices}, process_index="
                         f"{process_index}, process_count={process_count}")
    shards = num_local_devices * process_count
    if global_batch_size < 1 or global_batch_size % shards:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the number of devices "
            f"({process_count} process(es) x {num_local_devices} local device(s) = {shards}); "
            f"use a multiple of {shards}")
    return num_local_devices, global_batch_size // shards, process_index, process_count


def _check_args(image_size: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _np_dtype(dtype: str):
    return np.dtype(tf.as_dtype(dtype).as_numpy_dtype)


def _options(threads: int = 0) -> tf.data.Options:
    """tf.data's options; ``threads > 0``: a private pool of that many threads, no autotuning."""
    options = tf.data.Options()
    options.deterministic = True  # parallel maps still return elements in order
    options.experimental_optimization.map_parallelization = threads == 0
    options.experimental_warm_start = True
    if threads > 0:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        options.autotune.enabled = False
    return options


def threads_beside(backend: str, cpu_count: Optional[int] = None) -> int:
    """Input threads for a run whose model computes on ``backend`` (0: tf.data's own choice).

    When the model trains on the CPU itself, tf.data's autotuned threads compete with XLA's for the
    same cores, and XLA's parallel ops wait for the descheduled thread: on 2 cores a resnet20 step
    at 32 px ran 28% slower with them than with batches from memory, and as fast with one input
    thread. CPU training is bound by compute (a 224 px ResNet-50 trains at a few images/s per core,
    one thread decodes ~400 JPEGs/s), so the input gets one thread per 8 cores.
    """
    if backend != "cpu":
        return 0
    return max(1, (cpu_count or os.cpu_count() or 1) // 8)


def _file_instructions(builder, split) -> Tuple[list, int]:
    """Files, per-file (skip, take) and total examples of a (sub)split, tfrecord only."""
    file_format = builder.info.file_format
    if file_format is not None and str(getattr(file_format, "value", file_format)) != "tfrecord":
        raise ValueError(f"{builder.info.full_name} was prepared as {file_format}; this pipeline "
                         "reads tfrecord: prepare it again with file_format='tfrecord'")
    split_info = builder.info.splits[split]
    instructions = [fi for fi in split_info.file_instructions if fi.take > 0]
    return instructions, split_info.num_examples


def _records(instructions, order_seed: Optional[tf.Tensor] = None,
             cycle_length: int = 16) -> tf.data.Dataset:
    """Serialized records of the given file ranges, files in a seeded random order if asked."""
    filenames = tf.constant([str(fi.filename) for fi in instructions])
    skips = tf.constant([fi.skip for fi in instructions], tf.int64)
    takes = tf.constant([fi.take for fi in instructions], tf.int64)

    def read(i):
        return tf.data.TFRecordDataset(filenames[i], buffer_size=1 << 20).skip(skips[i]).take(
            takes[i])

    return _interleaved(read, len(instructions), order_seed, cycle_length)


def _interleaved(read, num_files: int, order_seed: Optional[tf.Tensor],
                 cycle_length: int) -> tf.data.Dataset:
    """``read(i)`` of every file, files in a seeded random order if asked, one element of each
    in turn: the order :func:`_records` and :func:`_record_indices` share."""
    order = tf.range(num_files)
    if order_seed is not None:
        order = tf.random.experimental.stateless_shuffle(order, seed=order_seed)
    return tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=min(cycle_length, num_files), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _parse(builder, spec: sources.DatasetSpec):
    features = builder.info.features
    decoders = {spec.image_key: tfds.decode.SkipDecoding()}  # keep the encoded bytes for the crop

    def parse(serialized):
        example = features.deserialize_example(serialized, decoders=decoders)
        return example[spec.image_key], tf.cast(example[spec.label_key], tf.int32)

    return parse


def _as_written(fn):
    """``fn`` for ``Dataset.map`` / ``tf.function``, traced as written, without AutoGraph's
    rewrite of its source (and of everything it calls) into graph control flow: our
    preprocessing branches with ``tf.cond`` and Python values only, and the rewrite cost about
    4 s of CPU per training run's pipelines (an experiment's 6-step smoke run, process included:
    27.8-32.1 -> 23.9-26.6 s of CPU)."""
    return tf.autograph.experimental.do_not_convert(fn)


def _to_devices(num_devices: int):
    def reshape(batch):
        return {k: tf.reshape(v, tf.concat([[num_devices, -1], tf.shape(v)[1:]], 0))
                for k, v in batch.items()}

    return _as_written(reshape)


def _to_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    for batch in ds.as_numpy_iterator():
        yield batch


# Training sets whose preprocessed images take at most this many bytes, and whose augmentation is
# a fixed transform plus a flip (the experiments' `shapes` recipe), are decoded once and kept in
# memory: per step the pipeline then only gathers and flips. Decoding 16 PNGs per step cost a
# single-core resnet20 run on `shapes` 5 ms of its ~70 ms step; from the cache it is 1.5 ms. The
# images are captured by the pipeline's graph: the limit keeps that far below protobuf's 2 GiB.
CACHE_MAX_BYTES = 256 << 20


def _record_indices(instructions, order_seed: Optional[tf.Tensor] = None,
                    cycle_length: int = 16) -> tf.data.Dataset:
    """Like :func:`_records`, but each record's index in file order instead of its bytes."""
    starts = tf.constant(np.cumsum([0] + [fi.take for fi in instructions[:-1]]), tf.int64)
    takes = tf.constant([fi.take for fi in instructions], tf.int64)

    def read(i):
        return tf.data.Dataset.range(starts[i], starts[i] + takes[i])

    return _interleaved(read, len(instructions), order_seed, cycle_length)


def _decoded(instructions, parse, image_size: int, spec: sources.DatasetSpec,
             augment: preprocessing.AugmentConfig, dtype: str, threads: int
             ) -> Tuple[tf.Tensor, tf.Tensor]:
    """Every record's fixed-preprocessed image and label, in file order: ([n, H, W, 3], [n])."""
    def decode(serialized):
        image_bytes, label = parse(serialized)
        return preprocessing.preprocess_fixed(image_bytes, image_size, jpeg=spec.jpeg,
                                              augment=augment, mean=spec.mean, std=spec.std,
                                              dtype=dtype), label

    ds = _records(instructions).map(_as_written(decode), num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True).batch(1024).with_options(_options(threads))
    images, labels = zip(*ds.as_numpy_iterator())
    return tf.constant(np.concatenate(images)), tf.constant(np.concatenate(labels))


def _cached_train_dataset(indices: tf.data.Dataset, decoded: Tuple[tf.Tensor, tf.Tensor], *,
                          per_process_batch: int, num_devices: int, seed_root: tf.Tensor,
                          augment: preprocessing.AugmentConfig, prefetch: int,
                          threads: int) -> tf.data.Dataset:
    """(position, record index) stream -> the batches of :func:`train_dataset_from_records`."""
    images, labels = decoded

    def example(position, index):
        seed = tf.random.experimental.stateless_fold_in(seed_root, position)
        return {"image": preprocessing.train_flip(tf.gather(images, index), seed, augment),
                "label": tf.gather(labels, index)}

    return _map_and_batch(indices, example, per_process_batch, num_devices, prefetch, threads)


def train_dataset_from_records(records: tf.data.Dataset, parse, *, per_process_batch: int,
                               num_devices: int, image_size: int, seed_root: tf.Tensor,
                               jpeg: bool, augment: preprocessing.AugmentConfig, mean, std,
                               dtype: str, prefetch: int = tf.data.AUTOTUNE,
                               threads: int = 0) -> tf.data.Dataset:
    """(position, serialized record) stream -> augmented, batched, device-shaped training batches.

    Each example's augmentation seed is ``fold_in(seed_root, position)``. Shared with the
    benchmark so that it times exactly this code.
    """
    def preprocess(position, serialized):
        image_bytes, label = parse(serialized)
        seed = tf.random.experimental.stateless_fold_in(seed_root, position)
        image = preprocessing.preprocess_for_train(
            image_bytes, seed, image_size, jpeg=jpeg, augment=augment, mean=mean, std=std,
            dtype=dtype)
        return {"image": image, "label": label}

    return _map_and_batch(records, preprocess, per_process_batch, num_devices, prefetch, threads)


def _map_and_batch(ds: tf.data.Dataset, fn, per_process_batch: int, num_devices: int,
                   prefetch: int, threads: int) -> tf.data.Dataset:
    """``fn`` on every element (in order), full batches shaped for the local devices, prefetched."""
    ds = ds.map(_as_written(fn), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process_batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
    ds = ds.map(_to_devices(num_devices))
    return ds.prefetch(prefetch).with_options(_options(threads))


# ----------------------------------------------------------------------------- training


def create_train_iterator(
    name: str,
    data_dir: Optional[str],
    global_batch_size: int,
    image_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    dtype: str = "float32",
    augment: preprocessing.AugmentLike = None,
    num_local_devices: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    shuffle_buffer: int = 16_384,
    prefetch: int = tf.data.AUTOTUNE,
    threads: int = 0,
) -> Iterator[Batch]:
    """Infinite training batches ``dict(image=[D, b, H, W, 3], label=[D, b] int32)``.

    ``augment``: None (the dataset's defaults: Inception random-resized crop + flip), a preset
    (``"inception"``, ``"vgg"``, ``"alexnet"``, ``"none"``), ``"field=value,..."`` items, or a
    mapping of ``preprocessing.AugmentConfig`` fields (``flip``, ``pca_lighting``,
    ``scale_jitter=(256, 512)``, ``area_range``, ...). ``start_step`` resumes at the batch an
    uninterrupted run yields at that step. ``threads``: see :func:`threads_beside` (0: tf.data
    autotunes). The `shapes` dataset is generated on first use.
    """
    _check_args(image_size, dtype)
    devices, per_device, process_index, process_count = _layout(
        global_batch_size, num_local_devices, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    per_process = devices * per_device
    base, _ = sources.split_name(name)
    if base == "fake":
        preprocessing.parse_augment(augment)  # bad options fail here too
        return _fake_train(per_device, devices, image_size, dtype, seed, start_step, process_index)

    builder = sources.get_builder(name, data_dir, image_size, prepare_shapes=True)
    spec = sources.spec(name, builder)
    augment_cfg = preprocessing.parse_augment(augment, spec.augment_defaults)
    split = tfds.split_for_jax_process(spec.train_split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    instructions, n = _file_instructions(builder, split)
    if n < per_process:
        raise ValueError(f"{name}: this process's training shard has {n} examples, fewer than "
                         f"its batch of {per_process}; use a smaller batch")
    root = tf.constant([seed, process_index], tf.int64)
    order_root = tf.random.experimental.stateless_fold_in(root, 0)
    augment_root = tf.random.experimental.stateless_fold_in(root, 1)
    buffer = max(1, min(shuffle_buffer, n))

    cached = (preprocessing.is_fixed_then_flipped(augment_cfg)
              and n * image_size * image_size * 3 * _np_dtype(dtype).itemsize <= CACHE_MAX_BYTES)

    def epoch(e):
        epoch_seed = tf.random.experimental.stateless_fold_in(order_root, e)
        file_seed, shuffle_seed = tf.unstack(tf.random.experimental.stateless_split(epoch_seed, 2))
        # Cached: the records' indices in the same order (interleaving and shuffling do not look
        # at the elements), so both paths yield the same examples in the same order.
        records = (_record_indices if cached else _records)(instructions, file_seed).shuffle(
            buffer, seed=tf.random.stateless_uniform([], shuffle_seed, minval=None, maxval=None,
                                                     dtype=tf.int64))
        positions = tf.data.Dataset.range(e * n, (e + 1) * n)
        return tf.data.Dataset.zip(positions, records)

    start_epoch, offset = divmod(start_step * per_process, n)
    records = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
    if cached:
        ds = _cached_train_dataset(
            records, _decoded(instructions, _parse(builder, spec), image_size, spec, augment_cfg,
                              dtype, threads),
            per_process_batch=per_process, num_devices=devices, seed_root=augment_root,
            augment=augment_cfg, prefetch=prefetch, threads=threads)
        return _to_numpy(ds)
    ds = train_dataset_from_records(
        records, _parse(builder, spec), per_process_batch=per_process, num_devices=devices,
        image_size=image_size, seed_root=augment_root, jpeg=spec.jpeg, augment=augment_cfg,
        mean=spec.mean, std=spec.std, dtype=dtype, prefetch=prefetch, threads=threads)
    return _to_numpy(ds)


def _fake_train(per_device, devices, image_size, dtype, seed, start_step, process_index):
    """Random normalized images (one array, reused) and per-step random labels: no decoding."""
    rng = np.random.default_rng([seed, process_index])
    image = rng.standard_normal((devices, per_device, image_size, image_size, 3), np.float32)
    image = image.astype(_np_dtype(dtype))
    step = start_step
    while True:
        labels = np.random.default_rng([seed, process_index, step]).integers(
            0, FAKE_INFO["num_classes"], (devices, per_device), dtype=np.int32)
        yield {"image": image, "label": labels}
        step += 1


# ----------------------------------------------------------------------------- evaluation


def _eval_parts(num_examples: int, process_count: int) -> list:
    """Contiguous [start, end) part of each process, sizes differing by at most one."""
    bounds = [num_examples * i // process_count for i in range(process_count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def create_eval_iterator(
    name: str,
    data_dir: Optional[str],
    global_batch_size: int,
    image_size: int,
    *,
    dtype: str = "float32",
    num_local_devices: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = tf.data.AUTOTUNE,
    views_fn: Optional[Any] = None,
    threads: int = 0,
) -> Iterator[Batch]:
    """One pass over the evaluation split: ``dict(image, label, mask=[D, b] bool)``.

    Process ``i`` reads the ``i``-th contiguous part of the split; every process yields the same
    number of batches (padding with ``mask=False`` examples), as collective ops need.
    ``views_fn(image_bytes, spec) -> {key: tensor}`` replaces the centre crop (the test-time
    protocols of :mod:`cnn_jax.protocols`); padding examples are zeros of the same shapes.
    """
    _check_args(image_size, dtype)
    devices, per_device, process_index, process_count = _layout(
        global_batch_size, num_local_devices, process_index, process_count)
    per_process = devices * per_device
    base, _ = sources.split_name(name)
    if base == "fake":
        return _fake_eval(per_device, devices, image_size, dtype, process_index, process_count)

    builder = sources.get_builder(name, data_dir, image_size, prepare_shapes=True)
    spec = sources.spec(name, builder)
    total = builder.info.splits[spec.eval_split].num_examples
    parts = _eval_parts(total, process_count)
    start, end = parts[process_index]
    num_batches = math.ceil(max(e - s for s, e in parts) / per_process)
    parse = _parse(builder, spec)
    if views_fn is None:
        def views_fn(image_bytes, spec):
            return {"image": preprocessing.preprocess_for_eval(
                image_bytes, image_size, jpeg=spec.jpeg, crop_ratio=spec.eval_crop_ratio,
                mean=spec.mean, std=spec.std, dtype=dtype)}

    def preprocess(serialized):
        image_bytes, label = parse(serialized)
        return {**views_fn(image_bytes, spec), "label": label, "mask": tf.constant(True)}

    if end > start:
        instructions, n = _file_instructions(builder, f"{spec.eval_split}[{start}:{end}]")
        ds = _records(instructions).map(_as_written(preprocess),
                                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:  # more processes than examples
        n, ds = 0, None
    padding = tf.data.Dataset.from_tensors({
        **{k: tf.zeros(v.shape, v.dtype) for k, v in _views_spec(views_fn, spec).items()},
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }).repeat(num_batches * per_process - n)
    ds = padding if ds is None else ds.concatenate(padding)
    ds = ds.batch(per_process, drop_remainder=True).map(_to_devices(devices))
    return _to_numpy(ds.prefetch(prefetch).with_options(_options(threads)))


def _views_spec(views_fn, spec) -> Dict[str, tf.TensorSpec]:
    """Shapes and dtypes of ``views_fn``'s outputs, traced on a placeholder (nothing decoded)."""
    fn = tf.function(_as_written(lambda b: views_fn(b, spec)))
    concrete = fn.get_concrete_function(tf.TensorSpec([], tf.string))
    return {k: tf.TensorSpec(v.shape, v.dtype) for k, v in concrete.structured_outputs.items()}


def _fake_eval(per_device, devices, image_size, dtype, process_index, process_count):
    start, end = _eval_parts(FAKE_INFO["num_eval_examples"], process_count)[process_index]
    per_process = devices * per_device
    num_batches = math.ceil(math.ceil(FAKE_INFO["num_eval_examples"] / process_count) / per_process)
    image = np.random.default_rng([1, process_index]).standard_normal(
        (devices, per_device, image_size, image_size, 3), np.float32).astype(_np_dtype(dtype))
    for b in range(num_batches):
        position = start + b * per_process + np.arange(per_process)
        labels = np.random.default_rng([1, process_index, b]).integers(
            0, FAKE_INFO["num_classes"], per_process, dtype=np.int32)
        yield {"image": image, "label": labels.reshape(devices, per_device),
               "mask": (position < end).reshape(devices, per_device)}

