"""The papers' test-time protocols: centre crop, 10-crop and VGG's dense multi-scale evaluation.

- ``center``: one centre crop (``eval_crop_ratio`` of the shorter side, resized to ``image_size``);
  what training evaluates.
- ``ten_crop`` (Krizhevsky et al. 2012, Sec. 4.1; also GoogLeNet's simplest setting): the image
  resized to shorter side ``image_size / eval_crop_ratio`` (256 for 224), its four corner
  ``image_size`` crops and its centre crop, each with its horizontal flip; the ten softmax outputs
  are averaged.
- ``multiscale`` (Simonyan & Zisserman 2015, Sec. 3.2 and 4.2): the fully convolutional net on the
  image rescaled to shorter sides Q = 256, 384, 512 (times ``image_size / 224``), the class score
  map spatially averaged, with flips; the six softmax outputs are averaged. To keep one shape per
  batch each scale uses the central Q x Q square of the rescaled image (the paper uses the whole
  rescaled image). VGG runs with ``fully_conv=True`` (the same parameters); the global-average-
  pooling nets (ResNet, DenseNet, GoogLeNet) are fully convolutional already: their logits on a
  larger input are the spatial average of the class score map. AlexNet, which pools adaptively to
  6x6, is refused.

Averaging is over probabilities, computed stably as ``logsumexp(log_softmax) - log(views)``; the
reported loss is ``-log`` of the averaged probability of the true class (for ``center`` that is the
usual cross-entropy).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import tensorflow as tf

from cnn_jax import preprocessing

PROTOCOLS = ("center", "ten_crop", "multiscale")
MULTISCALE_SIDES = (256, 384, 512)  # for 224 crops (VGG's Q values)


def views_per_image(protocol: str) -> int:
    return {"center": 1, "ten_crop": 10, "multiscale": 2 * len(MULTISCALE_SIDES)}[protocol]


def multiscale_sides(image_size: int) -> Tuple[int, ...]:
    return tuple(int(round(q * image_size / 224)) for q in MULTISCALE_SIDES)


def relative_cost(protocol: str, image_size: int = 224) -> float:
    """Forward-pass pixels per image relative to ``center`` (convolution FLOPs scale with them)."""
    if protocol == "multiscale":
        return 2 * sum((q / image_size) ** 2 for q in multiscale_sides(image_size))
    return float(views_per_image(protocol))


def _decode(image_bytes: tf.Tensor, jpeg: bool) -> tf.Tensor:
    if jpeg:
        return tf.io.decode_jpeg(image_bytes, channels=3)
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def resize_shorter_side(image: tf.Tensor, side: int) -> tf.Tensor:
    """Float32 [0, 255] image with shorter side ``side`` (aspect kept), antialiased bilinear;
    unchanged when it already has that size."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = side / tf.minimum(h, w)
    new = tf.stack([tf.maximum(tf.cast(tf.round(h * scale), tf.int32), side),
                    tf.maximum(tf.cast(tf.round(w * scale), tf.int32), side)])
    image = tf.cast(image, tf.float32)
    return tf.cond(tf.reduce_all(tf.equal(new, shape[:2])), lambda: image,
                   lambda: tf.clip_by_value(
                       tf.image.resize(image, new, method="bilinear", antialias=True), 0., 255.))


def crop_offsets(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
    """[5, 2] (y, x) of the four corner crops and the centre crop (the centre as ``center``)."""
    dy, dx = height - size, width - size
    return tf.stack([[0, 0], [0, dx], [dy, 0], [dy, dx], [(dy + 1) // 2, (dx + 1) // 2]])


def ten_crop_views(image_bytes: tf.Tensor, image_size: int, *, jpeg: bool = True,
                   crop_ratio: float = preprocessing.EVAL_CROP_RATIO,
                   mean=preprocessing.IMAGENET_MEAN, std=preprocessing.IMAGENET_STD,
                   dtype="float32") -> Dict[str, tf.Tensor]:
    """``{'image': [5, s, s, 3]}``: corner and centre crops (the flips are added on the device)."""
    side = max(image_size, int(round(image_size / crop_ratio)))
    image = resize_shorter_side(_decode(image_bytes, jpeg), side)
    shape = tf.shape(image)
    offsets = crop_offsets(shape[0], shape[1], image_size)
    crops = tf.map_fn(lambda o: tf.slice(image, [o[0], o[1], 0], [image_size, image_size, 3]),
                      offsets, fn_output_signature=tf.float32)
    dtype = tf.as_dtype(dtype)
    return {"image": preprocessing.normalize(crops / 255.0, mean, std, dtype)}


def multiscale_views(image_bytes: tf.Tensor, image_size: int, *, jpeg: bool = True,
                     mean=preprocessing.IMAGENET_MEAN, std=preprocessing.IMAGENET_STD,
                     dtype="float32") -> Dict[str, tf.Tensor]:
    """``{'scale0': [Q0, Q0, 3], ...}``: the central square at each of VGG's test scales."""
    image = _decode(image_bytes, jpeg)
    dtype = tf.as_dtype(dtype)
    out = {}
    for i, q in enumerate(multiscale_sides(image_size)):
        scaled = resize_shorter_side(image, q)
        shape = tf.shape(scaled)
        y, x = (shape[0] - q + 1) // 2, (shape[1] - q + 1) // 2
        square = tf.slice(scaled, [y, x, 0], [q, q, 3])
        out[f"scale{i}"] = preprocessing.normalize(square / 255.0, mean, std, dtype)
    return out


def views_fn(protocol: str, image_size: int, dtype: str = "float32") -> Callable:
    """``fn(image_bytes, spec)`` for ``input_pipeline.create_eval_iterator``; None for centre."""
    if protocol == "center":
        return None
    if protocol == "ten_crop":
        return lambda b, spec: ten_crop_views(b, image_size, jpeg=spec.jpeg,
                                              crop_ratio=spec.eval_crop_ratio, mean=spec.mean,
                                              std=spec.std, dtype=dtype)
    if protocol == "multiscale":
        return lambda b, spec: multiscale_views(b, image_size, jpeg=spec.jpeg, mean=spec.mean,
                                                std=spec.std, dtype=dtype)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def protocol_model(model: Any, protocol: str) -> Any:
    """The module to run: VGG becomes fully convolutional for ``multiscale``."""
    if protocol != "multiscale":
        return model
    if hasattr(model, "fully_conv"):
        return model.clone(fully_conv=True)
    if type(model).__name__ == "AlexNet":
        raise ValueError("multiscale evaluation needs a fully convolutional net; AlexNet pools "
                         "adaptively to 6x6: use --protocol=ten_crop or center")
    return model


def average_log_probs(apply: Callable[[Any], Any], batch: Dict[str, Any], protocol: str):
    """[b, classes] log of the view-averaged softmax; ``apply(images) -> logits``.

    Flipped views are made here (on the device), for ``ten_crop`` and ``multiscale``.
    """
    import jax
    import jax.numpy as jnp

    keys = sorted(k for k in batch if k == "image" or k.startswith("scale"))
    log_probs = []
    for key in keys:
        x = batch[key]
        b = x.shape[0]
        if x.ndim == 5:  # [b, views, h, w, c]
            x = x.reshape((-1,) + x.shape[2:])
        flips = (x,) if protocol == "center" else (x, jnp.flip(x, axis=2))
        for view in flips:
            logits = apply(view)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            log_probs.append(jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(
                b, -1, logits.shape[-1]))
    log_probs = jnp.concatenate(log_probs, axis=1)
    return jax.nn.logsumexp(log_probs, axis=1) - math.log(log_probs.shape[1])


def metric_sums(log_probs, labels, mask, axis_name=None) -> Dict[str, Any]:
    """Summed loss, top-1/top-5 hits and count over the masked batch (psum over ``axis_name``)."""
    import jax
    import jax.numpy as jnp

    mask = mask.astype(jnp.float32)
    k = min(5, log_probs.shape[-1])
    _, top = jax.lax.top_k(log_probs, k)
    true = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    sums = {"loss": jnp.sum(-true * mask), "top1": jnp.sum((top[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask)}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def evaluate(model: Any, variables: Dict[str, Any], config: Any, protocol: str = "center",
             dp: Any = None) -> Dict[str, float]:
    """Top-1/top-5/loss of ``model`` over ``config.dataset``'s evaluation split, with ``protocol``,
    every example once (the last batch padded and masked), over every local device."""
    from cnn_jax import parallel, train_lib

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    dp = dp or parallel.DataParallel(config.parallel)
    net = protocol_model(model, protocol)

    def per_device(variables, batch):
        log_probs = average_log_probs(lambda x: net.apply(variables, x, train=False), batch,
                                      protocol)
        return metric_sums(log_probs, batch["label"], batch["mask"], dp.axis_name)

    return train_lib.evaluate(dp.map(per_device), dp.replicate(variables), dp, config,
                              views_fn(protocol, config.image_size, config.dtype))

