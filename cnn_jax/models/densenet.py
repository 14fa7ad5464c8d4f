"""DenseNet (Huang et al. 2017, "Densely connected convolutional networks").

Every dense layer sees the concatenation of all earlier feature maps of its block and adds
``growth_rate`` new ones (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, the "-B" bottleneck); transitions
(BN-ReLU-1x1 conv-2x2 average pool) shrink the channels by ``compression`` (the "-C"), so every
registered variant is a DenseNet-BC. ``memory_efficient=True`` recomputes the concatenation, BN,
ReLU and 1x1 conv of each layer in the backward pass (``nn.remat``; Pleiss et al. 2017), so only
the ``growth_rate``-channel outputs of each layer are kept instead of every concatenation.
In training, each feature map is batch-normalized by its own batch statistics once, by the first
layer that reads it (``layers.ConcatBatchNorm``); every later layer's BN (and the transition's)
only scales, shifts and concatenates, instead of recomputing the statistics of its whole input.

Parameter names follow torchvision's state_dict, with the first '.' after ``features`` turned into
'_' and the rest into '/' nesting: ``features.conv0.weight`` is ``features_conv0/kernel``, and
``features.denseblock1.denselayer1.norm1.weight`` is
``features_denseblock1/denselayer1/norm1/scale``
(``running_mean`` -> ``batch_stats`` ``.../norm1/mean``, ``running_var`` -> ``.../norm1/var``),
``features.transition1.conv.weight`` is ``features_transition1/conv/kernel``,
``features.norm5.bias`` is ``features_norm5/bias`` and ``classifier.weight`` is
``classifier/kernel`` (conv kernels OIHW -> HWIO, linear weights transposed).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers
from cnn_jax.models.registry import TorchvisionRef, path_rewrites, register_model

Array = jax.Array

# name: (growth_rate, block_config, num_init_features), torchvision's table (Huang et al., Table 1).
DENSENET_CONFIGS: Dict[str, Tuple[int, Tuple[int, ...], int]] = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}

STEMS = ("imagenet", "cifar")

# torchvision's init: kaiming_normal_ (fan_in, ReLU gain) for convs; torch's default for Linear
# weights, U(+-1/sqrt(fan_in)); zero bias.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# torchvision's state_dict prefix of each Flax module path (features_denseblock1/denselayer1 -> features.denseblock1.denselayer1): cnn_jax.convert.
torchvision_keys = path_rewrites(
    (r"^features_", "features."))


class DenseLayer(nn.Module):
    """Bottleneck dense layer (Huang et al. 2017, Sec. 3): new ``growth_rate`` feature maps."""

    growth_rate: int
    bn_size: int = 4
    drop_rate: float = 0.0
    memory_efficient: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[Array], train: bool = False,
                 normalized: Sequence[layers.Normalized] = ()
                 ) -> Tuple[Array, Tuple[layers.Normalized, ...]]:
        """The new feature maps, and ``normalized`` extended by the inputs this layer normalized
        first (``layers.ConcatBatchNorm``: each input's batch statistics are computed once)."""
        def bottleneck(module: DenseLayer, inputs: Sequence[Array], normalized):
            x, normalized = layers.batch_norm(train, module.dtype, "norm1", concat=True)(
                inputs, normalized)
            x = layers.Conv2d(module.bn_size * module.growth_rate, (1, 1), use_bias=False,
                              dtype=module.dtype, kernel_init=_conv_init, float32_sums=True,
                              name="conv1")(nn.relu(x))
            return x, normalized

        if self.memory_efficient:
            # Only the inputs (each layer's own k channels) are saved for the backward pass; the
            # normalized pieces, their concatenation, ReLU and conv are recomputed there, so each
            # layer normalizes its inputs itself and shares nothing. ``train`` is a closed-over
            # Python bool, so it needs no static_argnums; batch_stats updates happen in the forward.
            x = nn.remat(lambda module, inputs: bottleneck(module, inputs, ())[0])(
                self, list(inputs))
        else:
            x, normalized = bottleneck(self, inputs, normalized)
        x = nn.relu(layers.batch_norm(train, self.dtype, "norm2")(x))
        x = layers.Conv2d(self.growth_rate, (3, 3), padding=layers.torch_padding(1), use_bias=False,
                          dtype=self.dtype, kernel_init=_conv_init, name="conv2")(x)
        return nn.Dropout(self.drop_rate, deterministic=not train, name="dropout")(x), normalized


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; returns the input and every new feature map (the pieces of
    the block's output, in channel order) and the pieces' ``layers.Normalized`` so far, which the
    transition's BN reuses."""

    num_layers: int
    growth_rate: int
    bn_size: int = 4
    drop_rate: float = 0.0
    memory_efficient: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False
                 ) -> Tuple[Tuple[Array, ...], Tuple[layers.Normalized, ...]]:
        features, normalized = [x], ()
        for i in range(self.num_layers):
            new, normalized = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate,
                                         self.memory_efficient, self.dtype,
                                         name=f"denselayer{i + 1}")(features, train, normalized)
            features.append(new)
        return tuple(features), normalized


class Transition(nn.Module):
    """Transition layer (Huang et al. 2017, Sec. 3): BN-ReLU-1x1 conv-2x2 average pool."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pieces: Sequence[Array], train: bool = False,
                 normalized: Sequence[layers.Normalized] = ()) -> Array:
        """``pieces``: a dense block's output, as ``DenseBlock`` returns it."""
        x, _ = layers.batch_norm(train, self.dtype, "norm", concat=True)(pieces, normalized)
        x = nn.relu(x)
        conv = layers.Conv2d(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                             kernel_init=_conv_init, name="conv")
        if layers.use_fast_formulations("conv1x1"):
            # Pool first: both are linear and a 1x1 convolution acts on each position alone, so
            # they commute (the same outputs up to float rounding), and the product then runs
            # on a quarter of the positions: densenet121's train step ~10% faster on the CPU
            # (README, Fast layers); XLA's path (GPUs, cnn_jax.analysis) keeps the paper's order.
            return conv(layers.avg_pool(x, 2, 2))
        return layers.avg_pool(conv(x), 2, 2)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017, Table 1 for ImageNet, Sec. 4.1 for CIFAR)."""

    num_classes: int = 1000
    dtype: Any = jnp.float32
    growth_rate: int = 32
    block_config: Tuple[int, ...] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4  # bottleneck width = bn_size * growth_rate
    compression: float = 0.5  # theta: a transition keeps floor(theta * m) of m channels
    # Dropout on each layer's new features, as torchvision (the paper's CIFAR runs without data
    # augmentation use 0.2 and also drop after the 1x1 and transition convs).
    drop_rate: float = 0.0
    memory_efficient: bool = False
    stem: str = "imagenet"  # "imagenet": 7x7/2 conv-BN-ReLU-3x3/2 max pool; "cifar": one 3x3 conv

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.stem not in STEMS:
            raise ValueError(f"unknown DenseNet stem {self.stem!r}; choose one of {STEMS}")
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")

        if self.stem == "imagenet":
            x = layers.Conv2d(self.num_init_features, (7, 7), strides=(2, 2),
                              padding=layers.torch_padding(3), use_bias=False, dtype=self.dtype,
                              kernel_init=_conv_init, name="features_conv0")(x)
            x = nn.relu(layers.batch_norm(train, self.dtype, "features_norm0")(x))
            x = layers.max_pool(x, 3, 2, padding=1)
        else:
            # The first dense layer's BN-ReLU follows directly (the paper's CIFAR networks).
            x = layers.Conv2d(self.num_init_features, (3, 3), padding=layers.torch_padding(1),
                              use_bias=False, dtype=self.dtype, kernel_init=_conv_init,
                              name="features_conv0")(x)

        num_features = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            pieces, normalized = DenseBlock(num_layers, self.growth_rate, self.bn_size,
                                            self.drop_rate, self.memory_efficient, self.dtype,
                                            name=f"features_denseblock{i + 1}")(x, train)
            num_features += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                num_features = int(math.floor(num_features * self.compression))
                x = Transition(num_features, self.dtype, name=f"features_transition{i + 1}")(
                    pieces, train, normalized)

        x, _ = layers.batch_norm(train, self.dtype, "features_norm5", concat=True)(
            pieces, normalized)
        x = nn.relu(x)
        x = layers.global_avg_pool(x)
        return layers.Dense(self.num_classes, dtype=self.dtype, kernel_init=_linear_init,
                        name="classifier")(x)


def _densenet(name: str, **kwargs) -> DenseNet:
    growth_rate, block_config, num_init_features = DENSENET_CONFIGS[name]
    return DenseNet(**{"growth_rate": growth_rate, "block_config": block_config,
                       "num_init_features": num_init_features, **kwargs})


def densenet_bc_cifar(depth: int = 100, growth_rate: int = 12, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC of depth L (Huang et al. 2017, Sec. 4.1): 3 blocks of (L-4)/6 layers."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 40, 100, 190), got {depth}")
    n = (depth - 4) // 6  # each bottleneck layer holds two convs; 4 = stem + 2 transitions + fc
    return DenseNet(**{"num_classes": 10, "growth_rate": growth_rate, "block_config": (n, n, n),
                       "num_init_features": 2 * growth_rate, "stem": "cifar", **kwargs})


# What every DenseNet entry shares. The ImageNet stem and three transitions need 29 px
# (torchvision's min_size); the CIFAR stem and two transitions need 4.
_META = dict(family="densenet", has_batch_norm=True, classifier=("classifier",),
             torchvision_keys=torchvision_keys, paper="Huang et al. 2017")


# torchvision's IMAGENET1K_V1 weights: acc@1, acc@5, GFLOPS (MACs at 224 px).
@register_model(**_META, min_input_size=29,
                torchvision=TorchvisionRef("densenet121", 74.434, 91.972, 2.834))
def densenet121(**kwargs) -> DenseNet:
    return _densenet("densenet121", **kwargs)


@register_model(**_META, min_input_size=29,
                torchvision=TorchvisionRef("densenet161", 77.138, 93.56, 7.728))
def densenet161(**kwargs) -> DenseNet:
    return _densenet("densenet161", **kwargs)


@register_model(**_META, min_input_size=29,
                torchvision=TorchvisionRef("densenet169", 75.6, 92.806, 3.36))
def densenet169(**kwargs) -> DenseNet:
    return _densenet("densenet169", **kwargs)


@register_model(**_META, min_input_size=29,
                torchvision=TorchvisionRef("densenet201", 76.896, 93.37, 4.291))
def densenet201(**kwargs) -> DenseNet:
    return _densenet("densenet201", **kwargs)


@register_model(**_META, min_input_size=4, default_input_size=32)
def densenet_bc_100(**kwargs) -> DenseNet:
    """DenseNet-BC (L=100, k=12) for CIFAR, about 0.8M parameters."""
    return densenet_bc_cifar(100, 12, **kwargs)
