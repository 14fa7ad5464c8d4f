"""Layers shared by every family: torch-style padded conv/pool, conv-norm-act, LRN, heads.

All tensors are NHWC. Padding is given as torch's symmetric integer padding rather than Flax's
``'SAME'``: ``'SAME'`` pads asymmetrically for stride-2 layers (more on the bottom/right), which
shifts every sampling grid by one pixel and breaks weight compatibility with torchvision.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
IntOrPair = Union[int, Tuple[int, int]]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}

# Kaiming-normal with fan_out, torchvision's init for conv layers of ReLU networks (He et al. 2015).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def get_activation(name: str) -> Callable[[Array], Array]:
    """Return the activation function registered under ``name``."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def pair(v: IntOrPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def torch_padding(padding: IntOrPair) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Symmetric (torch-style) padding as Flax's per-dimension ``(low, high)`` pairs."""
    ph, pw = pair(padding)
    return ((ph, ph), (pw, pw))


def _ceil_extra(size: int, window: int, stride: int, pad: int) -> int:
    """Extra high-side padding that turns floor-mode pooling into torch's ``ceil_mode=True``.

    torch adds one output when the last window would start inside the (left-padded) input, but
    never one that starts in the right padding only.
    """
    out_floor = (size + 2 * pad - window) // stride + 1
    out_ceil = -(-(size + 2 * pad - window) // stride) + 1
    if (out_ceil - 1) * stride >= size + pad:
        out_ceil -= 1
    return max(0, (out_ceil - out_floor) * stride)


def max_pool(x: Array, window: IntOrPair, stride: IntOrPair, padding: IntOrPair = 0,
             ceil_mode: bool = False) -> Array:
    """torch ``MaxPool2d`` on NHWC: -inf padding, optional ``ceil_mode``."""
    (kh, kw), (sh, sw), (ph, pw) = pair(window), pair(stride), pair(padding)
    eh = _ceil_extra(x.shape[1], kh, sh, ph) if ceil_mode else 0
    ew = _ceil_extra(x.shape[2], kw, sw, pw) if ceil_mode else 0
    return nn.max_pool(x, (kh, kw), (sh, sw), padding=((ph, ph + eh), (pw, pw + ew)))


def avg_pool(x: Array, window: IntOrPair, stride: IntOrPair, padding: IntOrPair = 0) -> Array:
    """torch ``AvgPool2d`` on NHWC (``count_include_pad=True``, torch's default)."""
    return nn.avg_pool(x, pair(window), pair(stride), padding=torch_padding(padding),
                       count_include_pad=True)


def adaptive_avg_pool(x: Array, output_size: IntOrPair) -> Array:
    """torch ``AdaptiveAvgPool2d`` on NHWC: bin i averages rows floor(iH/o) .. ceil((i+1)H/o)."""
    oh, ow = pair(output_size)
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:  # equal, non-overlapping bins: a plain average pool
        return nn.avg_pool(x, (h // oh, w // ow), (h // oh, w // ow))

    def bins(n: int, o: int):
        return [(math.floor(i * n / o), math.ceil((i + 1) * n / o)) for i in range(o)]

    rows = [jnp.mean(x[:, a:b], axis=1) for a, b in bins(h, oh)]  # each [N, W, C]
    x = jnp.stack(rows, axis=1)  # [N, oh, W, C]
    cols = [jnp.mean(x[:, :, a:b], axis=2) for a, b in bins(w, ow)]
    return jnp.stack(cols, axis=2)


def global_avg_pool(x: Array) -> Array:
    """Average over the spatial axes: [N, H, W, C] -> [N, C]."""
    return jnp.mean(x, axis=(1, 2))


def flatten(x: Array) -> Array:
    """Flatten per example in NHWC (H, W, C) order; torch flattens (C, H, W), see cnn_jax.convert."""
    return x.reshape((x.shape[0], -1))


def batch_norm(train: bool, dtype: Optional[Dtype] = None, name: Optional[str] = None,
               epsilon: float = 1e-5, scale_init: Callable = nn.initializers.ones) -> nn.BatchNorm:
    """BatchNorm with torch's defaults (momentum 0.1 in torch = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                        dtype=dtype, scale_init=scale_init, name=name)


class ConvBNAct(nn.Module):
    """Conv -> BatchNorm -> activation (BN and activation optional); the conv has no bias under BN."""

    features: int
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: IntOrPair = 0
    groups: int = 1
    use_norm: bool = True
    activation: Optional[str] = "relu"
    bn_epsilon: float = 1e-5
    dtype: Optional[Dtype] = None
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = nn.Conv(
            self.features,
            pair(self.kernel_size),
            strides=pair(self.strides),
            padding=torch_padding(self.padding),
            feature_group_count=self.groups,
            use_bias=not self.use_norm,  # BN's shift makes a conv bias redundant
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            name="conv",
        )(x)
        if self.use_norm:
            x = batch_norm(train, self.dtype, "bn", epsilon=self.bn_epsilon)(x)
        if self.activation is not None:
            x = get_activation(self.activation)(x)
        return x


class LocalResponseNorm(nn.Module):
    """Local response normalization across channels (Krizhevsky et al. 2012, Sec. 3.3).

    ``b_c = a_c / (k + alpha * sum_{|c'-c| <= n//2} a_{c'}^2) ** beta``, the paper's formula.
    torch's ``nn.LocalResponseNorm`` divides ``alpha`` by ``n``; pass ``alpha / n`` to match it.
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # Compute in float32: the sum of squares overflows bf16's precision quickly.
        xf = x.astype(jnp.float32)
        sq = jnp.square(xf)
        half = self.size // 2
        # Sum over a channel window with zero padding (a 1D box filter along C).
        summed = jax.lax.reduce_window(
            sq, 0.0, jax.lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
            ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
        return (xf / jnp.power(self.k + self.alpha * summed, self.beta)).astype(x.dtype)


class DenseAsConv(nn.Module):
    """A fully connected layer that can also run as a convolution with the same weights.

    The kernel is stored as ``[in_features, out]`` with ``in_features = kh * kw * C`` in NHWC
    flatten order, so ``as_conv=True`` reshapes it to a ``[kh, kw, C, out]`` conv kernel: the
    fully-convolutional evaluation of Simonyan & Zisserman (2015), Sec. 3.2.
    """

    features: int
    window: Tuple[int, int] = (1, 1)  # spatial extent of the input this layer sees as a conv
    dtype: Optional[Dtype] = None
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: Array, as_conv: bool = False) -> Array:
        # As a dense layer x is already flattened; as a conv each output sees a kh x kw window.
        in_features = x.shape[-1] * (self.window[0] * self.window[1] if as_conv else 1)
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        if not as_conv:
            return x @ kernel + bias
        conv_kernel = kernel.reshape(self.window + (x.shape[-1], self.features))
        y = jax.lax.conv_general_dilated(x, conv_kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree (e.g. ``variables['params']``)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def split_logits(outputs: Any) -> Tuple[Array, Tuple[Array, ...]]:
    """Split a model's output into ``(logits, aux_logits)``.

    Every model returns logits, except GoogLeNet in train mode with auxiliary heads, which returns
    a tuple whose first entry is the main logits (torchvision's ``GoogLeNetOutputs`` order).
    """
    if isinstance(outputs, tuple):
        return outputs[0], tuple(o for o in outputs[1:] if o is not None)
    return outputs, ()
