"""GoogLeNet / Inception v1 (Szegedy et al. 2015, "Going deeper with convolutions").

Two layouts share one module:

- ``layout="torchvision"`` (the registered ``googlenet``): torchvision's weight-compatible variant,
  conv -> BatchNorm(eps=1e-3) -> ReLU everywhere, a 3x3 conv where the paper's third branch has a
  5x5 (a known deviation of torchvision's port), 2x2 pooling before 5a, dropout 0.2, and auxiliary
  heads with a 4x4 adaptive average pool.
- ``layout="paper"`` (``googlenet_paper``): the network of the paper's Table 1 and Fig. 3, conv with
  bias -> ReLU and no batch norm, a true 5x5 third branch, local response normalization after the
  stem's first pool and after conv3, 3x3 pooling before 5a, dropout 0.4, and auxiliary heads with a
  5x5/3 average pool.

Parameter names follow torchvision's state_dict with '.' -> '/' for nesting and the Sequential
index joined by '_': ``inception3a.branch2.0.conv.weight`` is ``inception3a/branch2_0/conv/kernel``,
``inception3a.branch4.1.bn.running_mean`` is ``batch_stats`` ``inception3a/branch4_1/bn/mean``
(index 1 because torchvision's ``branch4.0`` is the parameter-free max pool),
``aux1.conv.conv.weight`` is ``aux1/conv/conv/kernel``, ``aux1.fc1.weight`` is ``aux1/fc1/kernel``.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers
from cnn_jax.models.registry import TorchvisionRef, path_rewrites, register_model

Array = jax.Array

# Inception widths of the paper's Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
INCEPTION_WIDTHS: Dict[str, Tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}

LAYOUTS = ("torchvision", "paper")

# Smallest input side for which every pool still has an output (smaller maps shrink to 0x0): the
# paper's 3x3/2 pool before 5a needs a 2x2 map after 4e. The paper's auxiliary heads need 79.
MIN_INPUT_SIZE = {"torchvision": 15, "paper": 31}
PAPER_AUX_MIN_INPUT_SIZE = 79

# ImageNet statistics; ``transform_input`` maps (x - mean) / std inputs to (x - 0.5) / 0.5, the
# scaling torchvision's ported (originally TF/Caffe-trained) GoogLeNet weights expect.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's init: trunc_normal(std=0.01, a=-2, b=2), i.e. N(0, 0.01^2) in practice. Without
# batch norm that is far too small for 22 layers, so the paper layout uses Caffe's "xavier" filler
# of the BVLC reference model (uniform, variance 1 / fan_in).
_TORCHVISION_INIT = nn.initializers.normal(0.01)
_PAPER_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


# torchvision's state_dict prefix of each Flax module path (inception3a/branch2_0/conv -> inception3a.branch2.0.conv): cnn_jax.convert.
torchvision_keys = path_rewrites(
    (r"/(branch\d)_(\d+)/", r"/\1.\2/"))


class GoogLeNetOutputs(NamedTuple):
    """Train-mode output with auxiliary heads, in torchvision's order (main logits first)."""

    logits: Array
    aux_logits2: Optional[Array]
    aux_logits1: Optional[Array]


class Inception(nn.Module):
    """Inception module (Szegedy et al. 2015, Fig. 2b): four branches concatenated on channels."""

    widths: Tuple[int, int, int, int, int, int]
    branch3_kernel: int = 3  # 5 in the paper; torchvision's port uses 3
    use_norm: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = _TORCHVISION_INIT

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = self.widths
        conv = functools.partial(layers.ConvBNAct, use_norm=self.use_norm, bn_epsilon=1e-3,
                                 dtype=self.dtype, kernel_init=self.kernel_init)
        k = self.branch3_kernel
        b1 = conv(ch1x1, 1, name="branch1")(x, train)
        b2 = conv(ch3x3red, 1, name="branch2_0")(x, train)
        b2 = conv(ch3x3, 3, padding=1, name="branch2_1")(b2, train)
        b3 = conv(ch5x5red, 1, name="branch3_0")(x, train)
        b3 = conv(ch5x5, k, padding=k // 2, name="branch3_1")(b3, train)
        b4 = layers.max_pool(x, 3, 1, padding=1, ceil_mode=True)
        b4 = conv(pool_proj, 1, name="branch4_1")(b4, train)
        return layers.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on 4a / 4d (Szegedy et al. 2015, Sec. 5), pool -> 1x1 conv -> 2 fc.

    The paper's 5x5/3 pool gives the 4x4x128 = 2048 inputs of fc1 only for 224x224 images (14x14
    at 4a); at other sizes fc1's width follows the pooled map, so its weights are size-specific.
    torchvision's adaptive pool keeps 2048 at every size.
    """

    num_classes: int
    paper_pool: bool = False  # paper: 5x5/3 average pool; torchvision: adaptive pool to 4x4
    use_norm: bool = True
    dropout: float = 0.7
    dtype: Any = jnp.float32
    kernel_init: Any = _TORCHVISION_INIT

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.paper_pool:
            if min(x.shape[1:3]) < 5:
                raise ValueError(
                    f"the paper's auxiliary heads need a feature map of at least 5x5 at 4a/4d, got "
                    f"{x.shape[1]}x{x.shape[2]}; use inputs of at least {PAPER_AUX_MIN_INPUT_SIZE}x"
                    f"{PAPER_AUX_MIN_INPUT_SIZE} or aux_logits=False")
            x = layers.avg_pool(x, 5, 3)
        else:
            x = layers.adaptive_avg_pool(x, 4)
        x = layers.ConvBNAct(128, 1, use_norm=self.use_norm, bn_epsilon=1e-3, dtype=self.dtype,
                             kernel_init=self.kernel_init, name="conv")(x, train)
        x = layers.flatten(x)
        x = layers.Dense(1024, dtype=self.dtype, kernel_init=self.kernel_init, name="fc1")(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        return layers.Dense(self.num_classes, dtype=self.dtype, kernel_init=self.kernel_init,
                        name="fc2")(x)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al. 2015, Table 1); see the module docstring for the two layouts.

    In train mode with ``aux_logits=True`` it returns ``GoogLeNetOutputs(logits, aux_logits2,
    aux_logits1)``, otherwise plain logits. The auxiliary heads' parameters are created by ``init``
    in either mode, so one variables tree serves training and evaluation.
    """

    num_classes: int = 1000
    dtype: Any = jnp.float32
    layout: str = "torchvision"
    aux_logits: bool = False
    transform_input: bool = False
    dropout: Optional[float] = None  # None: 0.2 (torchvision) or 0.4 (paper, Sec. 5)
    aux_dropout: float = 0.7

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Union[Array, GoogLeNetOutputs]:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown GoogLeNet layout {self.layout!r}; choose one of {LAYOUTS}")
        paper = self.layout == "paper"
        min_size = MIN_INPUT_SIZE[self.layout]
        if x.ndim != 4 or min(x.shape[1:3]) < min_size:
            raise ValueError(f"GoogLeNet ({self.layout} layout) expects NHWC images of at least "
                             f"{min_size}x{min_size}, got shape {x.shape}")
        kernel_init = _PAPER_INIT if paper else _TORCHVISION_INIT
        conv = functools.partial(layers.ConvBNAct, use_norm=not paper, bn_epsilon=1e-3,
                                 dtype=self.dtype, kernel_init=kernel_init)
        inception = functools.partial(Inception, branch3_kernel=5 if paper else 3,
                                      use_norm=not paper, dtype=self.dtype, kernel_init=kernel_init)
        aux = functools.partial(InceptionAux, self.num_classes, paper_pool=paper,
                                use_norm=not paper, dropout=self.aux_dropout, dtype=self.dtype,
                                kernel_init=kernel_init)
        # LRN as in the BVLC Caffe model (size 5, alpha 1e-4 divided by size, beta 0.75, k 1).
        lrn = functools.partial(layers.LocalResponseNorm, size=5, alpha=1e-4 / 5, beta=0.75, k=1.0)
        # Heads run in train mode only, but also at init so that their parameters always exist.
        run_aux = self.aux_logits and (train or self.is_initializing())

        if self.transform_input:
            mean, std = jnp.asarray(_IMAGENET_MEAN), jnp.asarray(_IMAGENET_STD)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5

        x = conv(64, 7, strides=2, padding=3, name="conv1")(x, train)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
        if paper:
            x = lrn(name="lrn1")(x)
        x = conv(64, 1, name="conv2")(x, train)
        x = conv(192, 3, padding=1, name="conv3")(x, train)
        if paper:
            x = lrn(name="lrn2")(x)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)

        x = inception(INCEPTION_WIDTHS["3a"], name="inception3a")(x, train)
        x = inception(INCEPTION_WIDTHS["3b"], name="inception3b")(x, train)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)

        x = inception(INCEPTION_WIDTHS["4a"], name="inception4a")(x, train)
        aux1 = aux(name="aux1")(x, train) if run_aux else None
        x = inception(INCEPTION_WIDTHS["4b"], name="inception4b")(x, train)
        x = inception(INCEPTION_WIDTHS["4c"], name="inception4c")(x, train)
        x = inception(INCEPTION_WIDTHS["4d"], name="inception4d")(x, train)
        aux2 = aux(name="aux2")(x, train) if run_aux else None
        x = inception(INCEPTION_WIDTHS["4e"], name="inception4e")(x, train)
        # The paper pools 3x3/2 here (Table 1); torchvision's port uses 2x2/2.
        window = 3 if paper else 2
        x = layers.max_pool(x, window, 2, ceil_mode=True)

        x = inception(INCEPTION_WIDTHS["5a"], name="inception5a")(x, train)
        x = inception(INCEPTION_WIDTHS["5b"], name="inception5b")(x, train)

        x = layers.global_avg_pool(x)  # the paper's 7x7/1 average pool at 224x224
        rate = self.dropout if self.dropout is not None else (0.4 if paper else 0.2)
        x = nn.Dropout(rate, deterministic=not train, name="dropout")(x)
        x = layers.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init, name="fc")(x)
        if self.aux_logits and train:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


# What both entries share; the auxiliary heads' 4x4 adaptive pools flatten into their fc1.
_META = dict(family="googlenet", classifier=("fc",), aux_classifiers=("aux1", "aux2"),
             torchvision_keys=torchvision_keys,
             flatten_inputs={"aux1/fc1": (4, 4), "aux2/fc1": (4, 4)}, paper="Szegedy et al. 2015")


# torchvision's IMAGENET1K_V1 weights (acc@1, acc@5, GFLOPS), which expect transform_input=True.
@register_model(**_META, has_batch_norm=True, min_input_size=MIN_INPUT_SIZE["torchvision"],
                torchvision=TorchvisionRef("googlenet", 69.778, 89.530, 1.498),
                torchvision_options={"transform_input": True})
def googlenet(**kwargs) -> GoogLeNet:
    """torchvision-compatible GoogLeNet (6,624,904 params; 13,004,888 with ``aux_logits=True``)."""
    return GoogLeNet(**kwargs)


@register_model(**_META, has_batch_norm=False, min_input_size=MIN_INPUT_SIZE["paper"])
def googlenet_paper(**kwargs) -> GoogLeNet:
    """GoogLeNet as in Szegedy et al. 2015: true 5x5 branches, LRN, no batch norm."""
    return GoogLeNet(**{"layout": "paper", **kwargs})
