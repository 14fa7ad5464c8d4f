"""ResNet (He et al. 2016, "Deep Residual Learning"; He et al. 2016, "Identity Mappings").

Layout and parameter names follow torchvision's ResNet v1.5 (the bottleneck strides on its 3x3
conv), so torchvision weights load by renaming ``.`` to ``_``: ``conv1``, ``bn1``,
``layer1_0/conv1`` ... ``layer4_2/downsample_bn``, ``fc``.

The paper's ideas are options of :class:`ResNet` (and of the blocks):

* ``shortcut``: 'A' identity, with the extra channels zero-padded and the map subsampled where the
  shape changes (no parameters); 'B' 1x1 projection only where the shape changes (torchvision);
  'C' a projection on every block (He et al. 2016a, Sec. 3.3 and Table 3).
* ``norm_placement``:

  - 'post': conv-BN-ReLU, addition, then ReLU (the 2016a paper; torchvision's parameter counts).
  - 'pre': full pre-activation (ResNet v2, He et al. 2016b, Fig. 4e): BN-ReLU-conv in the branch,
    nothing on the identity path, BN-ReLU before the pooling. The stem is conv1 alone (no ``bn1``):
    the first block's pre-activation normalizes it, and that block's shortcut takes the
    pre-activated input, as the paper does for its first unit. A shortcut that projects or
    subsamples ('A'/'B' where the shape changes, every 'C' projection) also takes the
    pre-activated input, and projections are a bare 1x1 conv (the next BN follows the addition).
    Parameters vs 'post': no ``bn1``, no ``downsample_bn``, plus ``final_bn``.
  - 'conv_relu_bn': every conv-BN-ReLU unit becomes conv-ReLU-BN (BN after the nonlinearity);
    the last conv of a branch and the projection have no ReLU of their own and stay conv-BN, the
    ReLU after the addition stays. Same parameters as 'post'.
  - 'none': no normalization; every conv has a bias instead (so the net keeps an affine shift).
    Parameters vs 'post': each BN's 2C become the preceding conv's C biases; no ``batch_stats``.

* ``zero_init_residual``: the last BN scale of each branch starts at 0 (Goyal et al. 2017), so
  every block starts as its shortcut (followed by the ReLU in the post-activation orderings).
  With 'none' the last conv of the branch starts at 0 instead (as in Fixup, Zhang et al. 2019).
* ``skip=False``: the plain networks of the paper (no shortcut at all).

The CIFAR-10 networks of Sec. 4.2 (``resnet20`` ... ``resnet110``: 3x3 conv stem with 16 filters,
three stages of n basic blocks with 16-32-64 filters, shortcut 'A') and their plain twins
(``plain20`` ...) are the same module with a ``'cifar'`` stem.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers
from cnn_jax.models.registry import TorchvisionRef, path_rewrites, register_model

Array = jax.Array
Dtype = Any

SHORTCUTS = ("A", "B", "C")
NORM_PLACEMENTS = ("post", "pre", "conv_relu_bn", "none")
STEMS = ("imagenet", "cifar")


# torchvision's state_dict prefix of each Flax module path (layer1_0/downsample_conv -> layer1.0.downsample.0): cnn_jax.convert.
torchvision_keys = path_rewrites(
    (r"^(layer\d+)_(\d+)/", r"\1.\2/"), (r"/downsample_conv$", "/downsample.0"),
    (r"/downsample_bn$", "/downsample.1"))


def _check_options(shortcut: str, norm_placement: str, zero_init_residual: bool,
                   skip: bool) -> None:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; choose one of {SHORTCUTS}")
    if norm_placement not in NORM_PLACEMENTS:
        raise ValueError(f"unknown norm_placement {norm_placement!r}; "
                         f"choose one of {NORM_PLACEMENTS}")
    if zero_init_residual and not skip:
        raise ValueError("zero_init_residual=True zeroes every block of a plain network "
                         "(skip=False); use it only with skip=True")


def pad_shortcut(x: Array, features: int, strides: int) -> Array:
    """Option A shortcut (He et al. 2016a, Sec. 3.3): subsample, then zero-pad new channels."""
    if features < x.shape[-1]:
        raise ValueError(f"shortcut 'A' cannot reduce {x.shape[-1]} channels to {features}; "
                         "use shortcut 'B' or 'C'")
    # x[::s] samples the same positions as a 1x1 stride-s conv: ceil(H / s) outputs.
    x = x[:, ::strides, ::strides]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


class _ResidualBlock(nn.Module):
    """A residual block: a branch of convs plus a shortcut, in any of the norm placements."""

    features: int  # torchvision's `planes`: the block outputs features * expansion channels
    strides: int = 1
    shortcut: str = "B"
    norm_placement: str = "post"
    zero_init_residual: bool = False
    skip: bool = True
    preact_shortcut: bool = False  # 'pre' only: shortcut sees BN-ReLU(x) even when identity
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0  # stochastic depth: drop the whole branch per example

    expansion: ClassVar[int] = 1

    def __post_init__(self):
        _check_options(self.shortcut, self.norm_placement, self.zero_init_residual, self.skip)
        super().__post_init__()

    def branch_convs(self) -> List[Tuple[int, int, int]]:
        """(kernel size, output features, stride) of each conv of the residual branch."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        place = self.norm_placement
        use_norm = place != "none"
        conv = partial(layers.Conv2d, use_bias=not use_norm, dtype=self.dtype,
                       kernel_init=layers.kaiming_normal_fan_out)
        norm = partial(layers.batch_norm, train, self.dtype)
        zero_last = self.zero_init_residual
        convs = self.branch_convs()
        last = len(convs)

        def bn(i: int) -> nn.Module:
            return norm(name=f"bn{i}",
                        scale_init=nn.initializers.zeros if zero_last and i == last
                        else nn.initializers.ones)

        preact = nn.relu(bn(1)(x)) if place == "pre" else x
        y = preact
        for i, (k, f, s) in enumerate(convs, start=1):
            if place == "pre" and i > 1:
                y = nn.relu(bn(i)(y))
            # Fixup-style: without BN, zeroing the last conv is what makes the branch start at 0.
            kernel_init = (nn.initializers.zeros if zero_last and place == "none" and i == last
                           else layers.kaiming_normal_fan_out)
            y = conv(f, (k, k), s, padding=layers.torch_padding(k // 2), kernel_init=kernel_init,
                     float32_sums=place == "post" or (place == "pre" and i < last),
                     name=f"conv{i}")(y)
            if place == "post":
                y = bn(i)(y)
                y = nn.relu(y) if i < last else y
            elif place == "conv_relu_bn":
                y = bn(i)(nn.relu(y) if i < last else y)
            elif place == "none" and i < last:
                y = nn.relu(y)

        if self.skip:
            # Stochastic depth (Huang et al. 2016): per-example branch drop, scaled by 1/(1-p).
            y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3),
                           deterministic=not train or not self.drop_path_rate)(y)
            y = y + self._shortcut(x, preact, convs[-1][1], conv, norm)
        # Pre-activation keeps the identity path clean: no ReLU after the addition.
        return y if place == "pre" else nn.relu(y)

    def _shortcut(self, x: Array, preact: Array, features: int, conv, norm) -> Array:
        reshapes = self.strides != 1 or x.shape[-1] != features
        project = self.shortcut == "C" or (self.shortcut == "B" and reshapes)
        if self.norm_placement == "pre" and (project or reshapes or self.preact_shortcut):
            x = preact
        if project:
            normed = self.norm_placement in ("post", "conv_relu_bn")  # BN right after the conv
            x = conv(features, (1, 1), self.strides, padding=0, float32_sums=normed,
                     name="downsample_conv")(x)
            return norm(name="downsample_bn")(x) if normed else x
        return pad_shortcut(x, features, self.strides) if reshapes else x


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (He et al. 2016a, Fig. 5 left)."""

    expansion: ClassVar[int] = 1

    def branch_convs(self) -> List[Tuple[int, int, int]]:
        return [(3, self.features, self.strides), (3, self.features, 1)]


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand x4 (He et al. 2016a, Fig. 5 right); stride on the 3x3 (v1.5)."""

    expansion: ClassVar[int] = 4

    def branch_convs(self) -> List[Tuple[int, int, int]]:
        f = self.features
        return [(1, f, 1), (3, f, self.strides), (1, f * self.expansion, 1)]


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Residual network (He et al. 2016a); options cover the paper's variants and ResNet v2."""

    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"  # 'basic' | 'bottleneck'
    widths: Sequence[int] = (64, 128, 256, 512)  # `planes` per stage; the stem has widths[0]
    stem: str = "imagenet"  # 'imagenet': 7x7/2 conv + 3x3/2 max pool; 'cifar': 3x3 conv
    shortcut: str = "B"
    norm_placement: str = "post"
    zero_init_residual: bool = False
    skip: bool = True
    # Stochastic depth (Huang et al. 2016): block i of N drops its branch with probability
    # drop_path_rate * i / (N - 1), the linear decay rule of the paper (and timm).
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _check_options(self.shortcut, self.norm_placement, self.zero_init_residual, self.skip)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; choose one of {sorted(BLOCKS)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choose one of {STEMS}")
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths "
                             f"{tuple(self.widths)} need one entry per stage")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        place = self.norm_placement
        conv = partial(layers.Conv2d, use_bias=place == "none", dtype=self.dtype,
                       kernel_init=layers.kaiming_normal_fan_out)
        norm = partial(layers.batch_norm, train, self.dtype)
        block_cls = partial(BLOCKS[self.block], shortcut=self.shortcut, norm_placement=place,
                            zero_init_residual=self.zero_init_residual, skip=self.skip,
                            dtype=self.dtype)

        if self.stem == "imagenet":
            x = conv(self.widths[0], (7, 7), 2, padding=layers.torch_padding(3), name="conv1")(x)
        else:
            x = conv(self.widths[0], (3, 3), 1, padding=layers.torch_padding(1), name="conv1")(x)
        if place == "post":
            x = nn.relu(norm(name="bn1")(x))
        elif place == "conv_relu_bn":
            x = norm(name="bn1")(nn.relu(x))
        elif place == "none":
            x = nn.relu(x)
        if self.stem == "imagenet":
            x = layers.max_pool(x, 3, 2, padding=1)

        num_blocks, b = sum(self.stage_sizes), 0
        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(blocks):
                rate = self.drop_path_rate * b / max(num_blocks - 1, 1)
                x = block_cls(width, strides=2 if i > 0 and j == 0 else 1,
                              preact_shortcut=(i, j) == (0, 0), drop_path_rate=rate,
                              name=f"layer{i + 1}_{j}")(x, train)
                b += 1

        if place == "pre":  # v2: the last unit's sum is never normalized otherwise
            x = nn.relu(norm(name="final_bn")(x))
        x = layers.global_avg_pool(x)
        return layers.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


# name -> (block, blocks per stage), He et al. 2016a, Table 1.
IMAGENET_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

# depth 6n + 2 -> n basic blocks per stage, He et al. 2016a, Sec. 4.2.
CIFAR_BLOCKS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


def _imagenet(name: str, **kwargs) -> ResNet:
    block, stages = IMAGENET_CONFIGS[name]
    return ResNet(**{"block": block, "stage_sizes": stages, **kwargs})


def _cifar(depth: int, **kwargs) -> ResNet:
    n = CIFAR_BLOCKS[depth]
    return ResNet(**{"num_classes": 10, "stage_sizes": (n, n, n), "widths": (16, 32, 64),
                     "stem": "cifar", "shortcut": "A", **kwargs})


# What every ResNet entry shares; any input size works (the global pool takes what is left).
_META = dict(family="resnet", has_batch_norm=True, min_input_size=1, classifier=("fc",),
             torchvision_keys=torchvision_keys, paper="He et al. 2016")
# The CIFAR-10 networks of Sec. 4.2: 32 px inputs, no torchvision weights.
_CIFAR_META = dict(_META, default_input_size=32)


# torchvision's IMAGENET1K_V1 weights: acc@1, acc@5, GFLOPS (MACs at 224 px).
@register_model(**_META, torchvision=TorchvisionRef("resnet18", 69.758, 89.078, 1.814))
def resnet18(**kwargs) -> ResNet:
    return _imagenet("resnet18", **kwargs)


@register_model(**_META, torchvision=TorchvisionRef("resnet34", 73.314, 91.42, 3.664))
def resnet34(**kwargs) -> ResNet:
    return _imagenet("resnet34", **kwargs)


@register_model(**_META, torchvision=TorchvisionRef("resnet50", 76.13, 92.862, 4.089))
def resnet50(**kwargs) -> ResNet:
    return _imagenet("resnet50", **kwargs)


@register_model(**_META, torchvision=TorchvisionRef("resnet101", 77.374, 93.546, 7.801))
def resnet101(**kwargs) -> ResNet:
    return _imagenet("resnet101", **kwargs)


@register_model(**_META, torchvision=TorchvisionRef("resnet152", 78.312, 94.046, 11.514))
def resnet152(**kwargs) -> ResNet:
    return _imagenet("resnet152", **kwargs)


@register_model(**_CIFAR_META)
def resnet20(**kwargs) -> ResNet:
    return _cifar(20, **kwargs)


@register_model(**_CIFAR_META)
def resnet32(**kwargs) -> ResNet:
    return _cifar(32, **kwargs)


@register_model(**_CIFAR_META)
def resnet44(**kwargs) -> ResNet:
    return _cifar(44, **kwargs)


@register_model(**_CIFAR_META)
def resnet56(**kwargs) -> ResNet:
    return _cifar(56, **kwargs)


@register_model(**_CIFAR_META)
def resnet110(**kwargs) -> ResNet:
    return _cifar(110, **kwargs)


@register_model(**_CIFAR_META)
def plain20(**kwargs) -> ResNet:
    return _cifar(20, **{"skip": False, **kwargs})


@register_model(**_CIFAR_META)
def plain32(**kwargs) -> ResNet:
    return _cifar(32, **{"skip": False, **kwargs})


@register_model(**_CIFAR_META)
def plain44(**kwargs) -> ResNet:
    return _cifar(44, **{"skip": False, **kwargs})


@register_model(**_CIFAR_META)
def plain56(**kwargs) -> ResNet:
    return _cifar(56, **{"skip": False, **kwargs})


@register_model(**_CIFAR_META)
def plain110(**kwargs) -> ResNet:
    return _cifar(110, **{"skip": False, **kwargs})
