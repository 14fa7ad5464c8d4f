"""Modern augmentation: TrivialAugment, RandAugment and random erasing (tf.data, per example) and
mixup / CutMix (JAX, per batch inside the train step).

Every random choice is a stateless op of an explicit seed (TF) or key (JAX), so a resumed run sees
the same augmented batches as an uninterrupted one.

- TrivialAugment: Mueller & Hutter 2021 ("TrivialAugment: Tuning-free Yet State-of-the-Art Data
  Augmentation"), the "wide" space of torchvision's ``TrivialAugmentWide``.
- RandAugment: Cubuk et al. 2020 ("RandAugment: Practical automated data augmentation with a
  reduced search space"), torchvision's ``RandAugment`` space (31 magnitude bins).
- Random erasing: Zhong et al. 2020 ("Random Erasing Data Augmentation"), torchvision's defaults.
- mixup: Zhang et al. 2018; CutMix: Yun et al. 2019 (partner = the batch rolled by one, as in
  torchvision's ``v2.MixUp``/``v2.CutMix``).
"""

from __future__ import annotations

import math
from typing import Tuple

import tensorflow as tf

# ----------------------------------------------------------------------------- TF image ops
# Each op maps a float32 [H, W, 3] image with values in [0, 255] and a magnitude to an image.

NUM_MAGNITUDE_BINS = 31
AUTO_AUGMENTS = ("", "trivial_augment", "rand_augment")


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor * (image - degenerate)``, clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    gray = tf.tensordot(image, tf.constant([0.299, 0.587, 0.114]), axes=[[2], [0]])
    return tf.round(gray)[..., None]


def _transform(image: tf.Tensor, transform) -> tf.Tensor:
    """Projective transform (output -> input pixel map), nearest neighbour, black fill."""
    shape = tf.shape(image)[:2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(tf.stack(transform)[None], tf.float32),
        output_shape=shape, fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
    return out[0]


def identity(image, m):
    del m
    return image


def shear_x(image, m):
    return _transform(image, [1.0, -m, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, m):
    return _transform(image, [1.0, 0.0, 0.0, -m, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, m):
    return _transform(image, [1.0, 0.0, -m, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, m):
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -m, 0.0, 0.0])


def rotate(image, degrees):
    """Rotation by ``degrees`` about the image centre."""
    theta = degrees * math.pi / 180.0
    c, s = tf.cos(theta), tf.sin(theta)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return _transform(image, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy, 0.0, 0.0])


def brightness(image, m):
    return _blend(tf.zeros_like(image), image, 1.0 + m)


def color(image, m):
    return _blend(_grayscale(image), image, 1.0 + m)


def contrast(image, m):
    return _blend(tf.reduce_mean(_grayscale(image)), image, 1.0 + m)


def sharpness(image, m):
    """PIL's SHARPEN: blend with a 3x3 smoothed image whose border pixels are left unchanged."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.round(smooth)
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    inner = tf.pad(tf.ones([h - 2, w - 2, 3]), [[1, 1], [1, 1], [0, 0]])
    degenerate = inner * smooth + (1.0 - inner) * image
    return _blend(degenerate, image, 1.0 + m)


def posterize(image, bits):
    shift = tf.cast(8 - tf.cast(bits, tf.int32), tf.float32)
    step = tf.pow(2.0, shift)
    return tf.floor(image / step) * step


def solarize(image, threshold):
    return tf.where(image >= threshold, 255.0 - image, image)


def autocontrast(image, m):
    del m
    lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.clip_by_value(tf.round((image - offset) * scale), 0.0, 255.0)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's ImageOps.equalize on one uint8-valued channel."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
        lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(lut, values), tf.float32)

    return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image, m):
    del m
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


# name -> (op, signed, magnitudes over the 31 bins as a function of the image width)
def _space(wide: bool, width: float):
    bins = NUM_MAGNITUDE_BINS
    lin = lambda lo, hi: [lo + (hi - lo) * i / (bins - 1) for i in range(bins)]  # noqa: E731
    posterize_levels = 6 if wide else 4
    return [
        ("identity", identity, False, [0.0] * bins),
        ("shear_x", shear_x, True, lin(0.0, 0.99 if wide else 0.3)),
        ("shear_y", shear_y, True, lin(0.0, 0.99 if wide else 0.3)),
        ("translate_x", translate_x, True, lin(0.0, 32.0 if wide else 150.0 / 331.0 * width)),
        ("translate_y", translate_y, True, lin(0.0, 32.0 if wide else 150.0 / 331.0 * width)),
        ("rotate", rotate, True, lin(0.0, 135.0 if wide else 30.0)),
        ("brightness", brightness, True, lin(0.0, 0.99 if wide else 0.9)),
        ("color", color, True, lin(0.0, 0.99 if wide else 0.9)),
        ("contrast", contrast, True, lin(0.0, 0.99 if wide else 0.9)),
        ("sharpness", sharpness, True, lin(0.0, 0.99 if wide else 0.9)),
        ("posterize", posterize, False,
         [float(8 - int(round(i / ((bins - 1) / posterize_levels)))) for i in range(bins)]),
        ("solarize", solarize, False, lin(255.0, 0.0)),
        ("autocontrast", autocontrast, False, [0.0] * bins),
        ("equalize", equalize, False, [0.0] * bins),
    ]


OP_NAMES = tuple(name for name, *_ in _space(True, 32.0))


def apply_op(image: tf.Tensor, index: tf.Tensor, magnitude_bin: tf.Tensor, negate: tf.Tensor,
             wide: bool = True) -> tf.Tensor:
    """Op ``index`` of the (wide) space at ``magnitude_bin``, negated for signed ops if asked."""
    width = float(image.shape[1]) if image.shape[1] is not None else 224.0
    space = _space(wide, width)

    def branch(op, signed, mags):
        def run():
            m = tf.gather(tf.constant(mags, tf.float32), magnitude_bin)
            if signed:
                m = tf.where(negate, -m, m)
            return op(image, m)
        return run

    return tf.switch_case(tf.cast(index, tf.int32),
                          [branch(op, signed, mags) for _, op, signed, mags in space])


def trivial_augment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """TrivialAugmentWide: one uniformly drawn op at a uniformly drawn magnitude and sign."""
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    s_op, s_mag, s_sign = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    index = tf.random.stateless_uniform([], s_op, 0, len(OP_NAMES), tf.int32)
    magnitude = tf.random.stateless_uniform([], s_mag, 0, NUM_MAGNITUDE_BINS, tf.int32)
    negate = tf.random.stateless_uniform([], s_sign) < 0.5
    return apply_op(image, index, magnitude, negate, wide=True)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: int = 9
                 ) -> tf.Tensor:
    """RandAugment: ``num_ops`` uniformly drawn ops at the fixed ``magnitude`` bin (of 31)."""
    if not 0 <= magnitude < NUM_MAGNITUDE_BINS:
        raise ValueError(f"rand_augment_magnitude must be in [0, {NUM_MAGNITUDE_BINS - 1}], "
                         f"got {magnitude}")
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    seeds = tf.random.experimental.stateless_split(seed, 2 * max(num_ops, 1))
    for i in range(num_ops):
        index = tf.random.stateless_uniform([], seeds[2 * i], 0, len(OP_NAMES), tf.int32)
        negate = tf.random.stateless_uniform([], seeds[2 * i + 1]) < 0.5
        image = apply_op(image, index, tf.constant(magnitude), negate, wide=False)
    return image


def random_erasing(image: tf.Tensor, seed: tf.Tensor, probability: float = 0.5,
                   scale: Tuple[float, float] = (0.02, 0.33),
                   ratio: Tuple[float, float] = (0.3, 3.3), value: float = 0.0,
                   attempts: int = 10) -> tf.Tensor:
    """Erase (set to ``value``) one random rectangle with ``probability``; on a normalized image
    ``value=0`` is the dataset mean, torchvision's default. The first of ``attempts`` sampled
    rectangles that fits is used; none fitting leaves the image as it is."""
    h = tf.shape(image)[0]
    w = tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    s_apply, s_area, s_ratio, s_y, s_x = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5))
    area = hf * wf * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]),
                                            math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    eh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = tf.logical_and(eh < h, ew < w)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    eh, ew = eh[first], ew[first]
    apply = tf.logical_and(tf.reduce_any(fits),
                           tf.random.stateless_uniform([], s_apply) < probability)
    y0 = tf.random.stateless_uniform([], s_y, 0, tf.maximum(h - eh + 1, 1), tf.int32)
    x0 = tf.random.stateless_uniform([], s_x, 0, tf.maximum(w - ew + 1, 1), tf.int32)
    ys = tf.range(h)[:, None]
    xs = tf.range(w)[None, :]
    box = (ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew) & apply
    return tf.where(box[..., None], tf.cast(value, image.dtype), image)


# ----------------------------------------------------------------------------- JAX batch ops


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def mixup(key, images, labels, alpha: float):
    """mixup: ``lam * x + (1 - lam) * x_rolled``, lam ~ Beta(alpha, alpha).

    Returns (images, labels, partner labels, lam); the loss is ``lam * CE(y) + (1 - lam) *
    CE(y_partner)``.
    """
    jax, jnp = _jax()
    lam = jax.random.beta(key, alpha, alpha).astype(jnp.float32)
    partner = jnp.roll(images, 1, axis=0)
    mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * partner.astype(jnp.float32)
    return mixed.astype(images.dtype), labels, jnp.roll(labels, 1, axis=0), lam


def cutmix(key, images, labels, alpha: float):
    """CutMix: paste a box of the rolled batch; lam = 1 - box area / image area (after clipping)."""
    jax, jnp = _jax()
    k_lam, k_y, k_x = jax.random.split(key, 3)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
    h, w = images.shape[1], images.shape[2]
    ratio = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.round(h * ratio).astype(jnp.int32), jnp.round(w * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    mixed = jnp.where(box[None, :, :, None], jnp.roll(images, 1, axis=0), images)
    lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    return mixed, labels, jnp.roll(labels, 1, axis=0), lam


def mix_batch(key, images, labels, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """mixup or CutMix (one of the two at random, 50/50, when both alphas are positive).

    Returns (images, labels, partner labels, lam), or None when both alphas are 0.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    if cutmix_alpha <= 0:
        return mixup(key, images, labels, mixup_alpha)
    if mixup_alpha <= 0:
        return cutmix(key, images, labels, cutmix_alpha)
    jax, jnp = _jax()
    k_choice, k_op = jax.random.split(key)
    use_cutmix = jax.random.bernoulli(k_choice)
    a = mixup(k_op, images, labels, mixup_alpha)
    b = cutmix(k_op, images, labels, cutmix_alpha)
    return (jnp.where(use_cutmix, b[0], a[0]), labels, a[2], jnp.where(use_cutmix, b[3], a[3]))


def check_mix_options(mixup_alpha: float, cutmix_alpha: float) -> None:
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if value < 0:
            raise ValueError(f"--config.{name} must be >= 0 (0 = off), got {value}")
