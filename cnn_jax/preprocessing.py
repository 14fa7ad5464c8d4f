"""Per-example image preprocessing in TensorFlow: the augmentations of the classic ImageNet papers.

Training crops are chosen on the encoded JPEG's header and decoded with ``decode_and_crop_jpeg``, so
only the pixels that are kept get decoded. Every random choice uses a stateless op seeded by a
per-example ``[2]`` seed, so the same (seed, example position) always gives the same crop, which is
what makes resuming a run reproduce the batches of an uninterrupted one.

- Random-resized crop: Szegedy et al. 2015, "Going deeper with convolutions" (area 8%-100%, aspect
  3/4-4/3), with a centre-crop fallback as in the reference TF/Flax ImageNet pipelines.
- Scale jittering: Simonyan & Zisserman 2015 (VGG), shorter side S ~ U[256, 512], random 224 crop.
- PCA lighting noise: Krizhevsky et al. 2012 (AlexNet) "fancy PCA", alpha ~ N(0, 0.1).
- Evaluation: resize the shorter side to ``image_size / 0.875`` and centre-crop ``image_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import tensorflow as tf

from cnn_jax import augment as augment_lib

# ImageNet channel statistics on [0, 1] RGB (the torchvision constants).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10/100 training-set statistics on [0, 1] RGB.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# Eigen-decomposition of ImageNet's RGB covariance on [0, 1] pixels (fb.resnet.torch's values).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
EVAL_CROP_RATIO = 0.875  # 224 / 256


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation options.

    ``crop``: ``"random_resized"`` (Inception), ``"scale_jitter"`` (VGG; uses ``scale_jitter``) or
    ``"center"`` (no random crop, the evaluation crop). ``scale_jitter`` is the shorter-side range
    for a 224 crop; for other ``image_size`` it is scaled by ``image_size / 224``.
    """

    crop: str = "random_resized"
    area_range: Tuple[float, float] = (0.08, 1.0)
    aspect_ratio_range: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    pca_lighting: bool = False
    pca_lighting_std: float = 0.1
    scale_jitter: Optional[Tuple[int, int]] = None
    # Antialiased resizing (PIL/torchvision style) costs ~40% of the pipeline's CPU time; random
    # crops are downscaled by < 2x, where plain bilinear (as the TF reference pipelines) is fine.
    antialias: bool = False
    # Modern recipes (cnn_jax.augment): "trivial_augment" (TrivialAugmentWide) or "rand_augment"
    # on the crop, and random erasing of the normalized image with this probability (0 = off).
    auto_augment: str = ""
    rand_augment_num_ops: int = 2
    rand_augment_magnitude: int = 9
    random_erasing: float = 0.0

    def __post_init__(self):
        if self.auto_augment not in augment_lib.AUTO_AUGMENTS:
            raise ValueError(f"unknown auto_augment {self.auto_augment!r}; use 'trivial_augment' "
                             "or 'rand_augment' (or leave it empty)")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got "
                             f"{self.random_erasing}")
        if self.crop not in ("random_resized", "scale_jitter", "center"):
            raise ValueError(f"unknown crop {self.crop!r}; use 'random_resized', 'scale_jitter' or "
                             "'center'")
        if self.crop == "scale_jitter" and not self.scale_jitter:
            raise ValueError("crop='scale_jitter' needs scale_jitter=(min_side, max_side), "
                             "e.g. (256, 512)")
        if self.scale_jitter and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max, "
                             f"got {self.scale_jitter}")


# Presets named after the paper whose training recipe they follow.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "inception": {},
    "vgg": {"crop": "scale_jitter", "scale_jitter": (256, 512)},
    # AlexNet: random 224 crops of the 256 image (S fixed at 256), flips and PCA lighting.
    "alexnet": {"crop": "scale_jitter", "scale_jitter": (256, 256), "pca_lighting": True},
    "none": {"crop": "center", "flip": False},
    # torchvision's "new training recipe" (Vryniotis 2021): Inception crop, flip, TrivialAugment,
    # random erasing p=0.1.
    "torchvision_v2": {"auto_augment": "trivial_augment", "random_erasing": 0.1},
}

AugmentLike = Union[None, str, Mapping[str, Any], AugmentConfig]


def _parse_value(key: str, text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if ":" in text or "/" in text:  # ranges written as 256:512
        return tuple(float(v) if "." in v else int(v) for v in text.replace("/", ":").split(":"))
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def parse_augment(augment: AugmentLike, base: Optional[Mapping[str, Any]] = None) -> AugmentConfig:
    """Turn ``augment`` into an ``AugmentConfig``.

    Accepts an ``AugmentConfig``; a mapping of its fields (a dict or an ml_collections ConfigDict);
    None (the defaults); or a string: a preset name (``inception``, ``vgg``, ``alexnet``, ``none``)
    and/or ``field=value`` items separated by commas, e.g. ``"vgg,pca_lighting=true"`` or
    ``"scale_jitter=256:512,crop=scale_jitter"``. ``base`` holds dataset defaults applied first.
    """
    if isinstance(augment, AugmentConfig):
        return augment
    fields = dict(base or {})
    if augment is None:
        pass
    elif isinstance(augment, str):
        for item in filter(None, (p.strip() for p in augment.split(","))):
            if "=" in item:
                key, value = item.split("=", 1)
                fields[key.strip()] = _parse_value(key, value)
            elif item in AUGMENT_PRESETS:
                fields.update(AUGMENT_PRESETS[item])
            else:
                raise ValueError(f"unknown augmentation preset {item!r}; use one of "
                                 f"{sorted(AUGMENT_PRESETS)} or field=value items")
    else:
        if hasattr(augment, "to_dict"):
            augment = augment.to_dict()
        fields.update(dict(augment))
    if fields.get("scale_jitter") and "crop" not in fields:
        fields["crop"] = "scale_jitter"  # asking for scale jittering means using it
    valid = {f.name for f in dataclasses.fields(AugmentConfig)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {unknown}; valid: {sorted(valid)}")
    for key in ("area_range", "aspect_ratio_range", "scale_jitter"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    return AugmentConfig(**fields)


# ----------------------------------------------------------------------------- crops


def decode_cropped(image_bytes: tf.Tensor, window_fn: Callable[[tf.Tensor], tf.Tensor],
                   jpeg: bool = True) -> tf.Tensor:
    """Decode the window ``window_fn(shape) = [y, x, h, w]`` of an encoded image to uint8 RGB.

    For JPEG the shape comes from the header and only the window is decoded
    (``decode_and_crop_jpeg``); other formats (PNG) are decoded whole, then sliced.
    """
    if jpeg:
        window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    window = window_fn(tf.shape(image))
    return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))


def center_window(shape: tf.Tensor, crop_ratio: float) -> tf.Tensor:
    """Centred square window [y, x, h, w] of side ``crop_ratio * min(h, w)``."""
    h, w = shape[0], shape[1]
    side = tf.cast(tf.math.round(crop_ratio * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def random_resized_window(shape: tf.Tensor, seed: tf.Tensor, area_range=(0.08, 1.0),
                          aspect_ratio_range=(3 / 4, 4 / 3), max_attempts: int = 10,
                          fallback_crop_ratio: float = EVAL_CROP_RATIO) -> tf.Tensor:
    """Inception crop window [y, x, h, w]; the centre crop if no sample fits in ``max_attempts``."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=aspect_ratio_range, area_range=area_range,
        max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
    # The sampler returns the whole image when every attempt fails.
    failed = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.where(failed, center_window(shape, fallback_crop_ratio), window)


def scale_jitter_window(shape: tf.Tensor, seed: tf.Tensor, image_size: int,
                        scale_range: Tuple[int, int]) -> tf.Tensor:
    """VGG crop window: an ``image_size`` crop of the image rescaled to shorter side S ~ U[range].

    Rather than resizing the whole image, the crop is mapped back to original pixels (a square of
    side ``image_size * min(h, w) / S``) so that only it is decoded and resized.
    """
    seed_s, seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    factor = image_size / 224.0
    s_min, s_max = scale_range[0] * factor, scale_range[1] * factor
    s = tf.random.stateless_uniform([], seed_s, minval=s_min, maxval=s_max + 1e-6)
    s = tf.maximum(s, float(image_size))
    h, w = shape[0], shape[1]
    side = tf.cast(tf.math.round(image_size * tf.cast(tf.minimum(h, w), tf.float32) / s), tf.int32)
    side = tf.clip_by_value(side, 1, tf.minimum(h, w))
    y = tf.random.stateless_uniform([], seed_y, minval=0, maxval=h - side + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], seed_x, minval=0, maxval=w - side + 1, dtype=tf.int32)
    return tf.stack([y, x, side, side])


# ----------------------------------------------------------------------------- pixels


def resize(image: tf.Tensor, image_size: int, antialias: bool = True) -> tf.Tensor:
    """Bilinear resize to [image_size, image_size], float32; antialias filters like PIL does."""
    image = tf.image.resize(image, [image_size, image_size], method="bilinear",
                            antialias=antialias)
    return tf.clip_by_value(image, 0.0, 255.0)


def pca_lighting(image: tf.Tensor, seed: tf.Tensor, alphastd: float = 0.1,
                 eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC) -> tf.Tensor:
    """AlexNet lighting noise on a [0, 1] image: adds ``eigvec @ (alpha * eigval)`` everywhere."""
    alpha = tf.random.stateless_normal([3], seed, stddev=alphastd)
    rgb = tf.linalg.matvec(tf.constant(eigvec, tf.float32), alpha * tf.constant(eigval, tf.float32))
    return image + rgb


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float], dtype=tf.float32):
    """[0, 1] RGB -> (x - mean) / std, cast to ``dtype``."""
    image = (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return tf.cast(image, dtype)


def _train_seeds(seed: tf.Tensor):
    """(crop, flip, lighting) seeds of one training example."""
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3))


def is_fixed_then_flipped(augment: AugmentConfig) -> bool:
    """Whether ``preprocess_for_train`` is a fixed function of the image followed by at most a
    seeded horizontal flip (centre crop, no colour, auto-augment or erasing): then each image can
    be decoded once (:func:`preprocess_fixed`) and only flipped per step (:func:`train_flip`)."""
    return (augment.crop == "center" and not augment.auto_augment and not augment.pca_lighting
            and augment.random_erasing == 0)


def preprocess_fixed(image_bytes: tf.Tensor, image_size: int, *, jpeg: bool = True,
                     augment: AugmentConfig = AugmentConfig(crop="center"),
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     dtype: Union[str, tf.DType] = tf.float32) -> tf.Tensor:
    """``preprocess_for_train`` without its flip, for ``is_fixed_then_flipped`` configs.

    The flip is a permutation of pixels and every later step is per pixel, so flipping this
    result (:func:`train_flip`) gives the same bits as ``preprocess_for_train``.
    """
    if not is_fixed_then_flipped(augment):
        raise ValueError(f"{augment} is not a fixed transform followed by a flip")
    image = resize(decode_cropped(image_bytes, lambda shape: center_window(shape, EVAL_CROP_RATIO),
                                  jpeg), image_size, augment.antialias)
    return tf.cast(normalize(image / 255.0, mean, std, tf.float32), tf.as_dtype(dtype))


def train_flip(image: tf.Tensor, seed: tf.Tensor, augment: AugmentConfig) -> tf.Tensor:
    """The seeded flip of ``preprocess_for_train`` (same seed, same flip), if ``augment.flip``."""
    if not augment.flip:
        return image
    return tf.image.stateless_random_flip_left_right(image, _train_seeds(seed)[1])


def preprocess_for_train(image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int, *,
                         jpeg: bool = True, augment: AugmentConfig = AugmentConfig(),
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         dtype: Union[str, tf.DType] = tf.float32) -> tf.Tensor:
    """Encoded image -> augmented, normalized [image_size, image_size, 3] in ``dtype``."""
    dtype = tf.as_dtype(dtype)
    crop_seed, flip_seed, light_seed = _train_seeds(seed)
    if augment.crop == "random_resized":
        window_fn = lambda shape: random_resized_window(  # noqa: E731
            shape, crop_seed, augment.area_range, augment.aspect_ratio_range)
    elif augment.crop == "scale_jitter":
        window_fn = lambda shape: scale_jitter_window(  # noqa: E731
            shape, crop_seed, image_size, augment.scale_jitter)
    else:
        window_fn = lambda shape: center_window(shape, EVAL_CROP_RATIO)  # noqa: E731
    image = resize(decode_cropped(image_bytes, window_fn, jpeg), image_size, augment.antialias)
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    # Seeds of the newer ops are folded in, so the crops/flips of existing recipes are unchanged.
    if augment.auto_augment:
        auto_seed = tf.random.experimental.stateless_fold_in(seed, 3)
        if augment.auto_augment == "trivial_augment":
            image = augment_lib.trivial_augment(image, auto_seed)
        else:
            image = augment_lib.rand_augment(image, auto_seed, augment.rand_augment_num_ops,
                                             augment.rand_augment_magnitude)
    image = image / 255.0
    if augment.pca_lighting:
        image = pca_lighting(image, light_seed, augment.pca_lighting_std)
    image = normalize(image, mean, std, tf.float32)
    if augment.random_erasing > 0:
        image = augment_lib.random_erasing(
            image, tf.random.experimental.stateless_fold_in(seed, 4), augment.random_erasing)
    return tf.cast(image, dtype)


def preprocess_for_eval(image_bytes: tf.Tensor, image_size: int, *, jpeg: bool = True,
                        crop_ratio: float = EVAL_CROP_RATIO, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD,
                        dtype: Union[str, tf.DType] = tf.float32,
                        antialias: bool = True) -> tf.Tensor:
    """Centre crop of ``crop_ratio`` of the shorter side, resized to ``image_size``, normalized.

    Equal to resizing the shorter side to ``image_size / crop_ratio`` and centre-cropping
    ``image_size`` (256 -> 224 for ImageNet), but only the kept pixels are decoded and resized.
    Antialiased by default, like torchvision's evaluation transform (for comparable accuracies).
    """
    dtype = tf.as_dtype(dtype)
    window_fn = lambda shape: center_window(shape, crop_ratio)  # noqa: E731
    image = resize(decode_cropped(image_bytes, window_fn, jpeg), image_size, antialias) / 255.0
    return normalize(image, mean, std, dtype)
