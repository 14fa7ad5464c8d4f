"""VGG (Simonyan & Zisserman 2015): configurations A-E, A-LRN and C, with and without batch norm.

Configurations are data (``CONFIGS``): an int is a 3x3 stride-1 pad-1 conv with that many filters,
``"1x1:N"`` a 1x1 conv (config C), ``"M"`` a 2x2 stride-2 max pool and ``"LRN"`` local response
normalization (config A-LRN). Submodules follow the paper's Caffe names (``conv3_2`` = block 3,
conv 2; ``fc6``-``fc8``); ``torchvision_names`` gives the mapping to torchvision's ``features.N``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers
from cnn_jax.models.registry import register_model

Entry = Union[int, str]

CONFIGS: dict[str, Tuple[Entry, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "A-LRN": (64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "C": (64, 64, "M", 128, 128, "M", 256, 256, "1x1:256", "M", 512, 512, "1x1:512", "M",
          512, 512, "1x1:512", "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}

# torchvision's conv init (He et al. 2015, fan_out) and N(0, 0.01) for the linear layers.
_conv_init = layers.kaiming_normal_fan_out
_fc_init = nn.initializers.normal(0.01)


def _parse(entry: Entry) -> Tuple[str, int, int]:
    """A table entry as ``(kind, features, kernel)``; kind is 'conv', 'M' or 'LRN'."""
    if isinstance(entry, int):
        return "conv", entry, 3
    if entry in ("M", "LRN"):
        return entry, 0, 0
    if isinstance(entry, str) and entry.startswith("1x1:"):
        return "conv", int(entry[4:]), 1
    raise ValueError(f"bad VGG config entry {entry!r}: use an int, '1x1:N', 'M' or 'LRN'")


def _layer_names(cfg: Sequence[Entry]) -> list[Tuple[str, Optional[str]]]:
    """Per entry: (kind, name) with Caffe-style names ``conv{block}_{i}`` / ``lrn{block}_{i}``."""
    names, block, i = [], 1, 0
    for entry in cfg:
        kind = _parse(entry)[0]
        if kind == "M":
            names.append((kind, None))
            block, i = block + 1, 0
        elif kind == "LRN":
            names.append((kind, f"lrn{block}_{i}"))
        else:
            i += 1
            names.append((kind, f"conv{block}_{i}"))
    return names


def torchvision_names(cfg: Sequence[Entry], batch_norm: bool) -> dict[str, str]:
    """torchvision ``vgg*`` state_dict prefix -> submodule here, e.g. ``'features.2' -> 'conv1_2'``.

    torchvision numbers every layer of ``features`` (conv, [bn], relu, pool). BN ``weight``/``bias``
    are ``scale``/``bias`` here; fc6 flattens torch's (512, 7, 7) where this module flattens NHWC.
    """
    mapping, index = {}, 0
    for kind, name in _layer_names(cfg):
        if kind == "conv":
            mapping[f"features.{index}"] = name
            if batch_norm:
                mapping[f"features.{index + 1}"] = name.replace("conv", "bn")
            index += 3 if batch_norm else 2  # conv, [bn], relu
        else:
            index += 1
    mapping.update({"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8"})
    return mapping


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman 2015) with the paper's fully-convolutional evaluation as an option.

    ``fully_conv=True`` (Sec. 3.2) skips the adaptive pool, runs fc6 as a 7x7 VALID conv and fc7/fc8
    as 1x1 convs with the same parameters, and averages the class score map, so inputs of any size
    >= 224 work; at 224x224 the logits equal the dense head's.
    """

    num_classes: int = 1000
    dtype: Any = jnp.float32
    cfg: Tuple[Entry, ...] = CONFIGS["D"]
    batch_norm: bool = False
    fc_features: int = 4096
    dropout_rate: float = 0.5
    fully_conv: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        num_pools = sum(1 for e in self.cfg if e == "M")
        min_size = 2 ** num_pools * (7 if self.fully_conv else 1)
        if min(x.shape[1:3]) < min_size:
            mode = "fully-convolutional VGG" if self.fully_conv else "VGG"
            raise ValueError(f"{mode} input {x.shape[1]}x{x.shape[2]} is too small: use images of "
                             f"at least {min_size}x{min_size} pixels")

        x = x.astype(self.dtype)
        for entry, (kind, name) in zip(self.cfg, _layer_names(self.cfg)):
            if kind == "M":
                x = layers.max_pool(x, 2, 2)
            elif kind == "LRN":
                # Sec. 2.2: the LRN parameters are those of Krizhevsky et al. (2012).
                x = layers.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0, name=name)(x)
            else:
                _, features, kernel = _parse(entry)
                # torchvision's vgg*_bn keep the conv bias in front of BN (its counts include it).
                x = layers.Conv2d(features, (kernel, kernel), padding=layers.torch_padding(kernel // 2),
                                  dtype=self.dtype, kernel_init=_conv_init, name=name)(x)
                if self.batch_norm:
                    x = layers.batch_norm(train, self.dtype, name.replace("conv", "bn"))(x)
                x = nn.relu(x)
        self.sow("intermediates", "features", x)  # last conv map, before the head

        if not self.fully_conv:
            x = layers.flatten(layers.adaptive_avg_pool(x, 7))
        for name, width, window in (("fc6", self.fc_features, (7, 7)),
                                    ("fc7", self.fc_features, (1, 1))):
            x = layers.DenseAsConv(width, window, dtype=self.dtype, kernel_init=_fc_init,
                                   name=name)(x, as_conv=self.fully_conv)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{name[-1]}")(x)
        x = layers.DenseAsConv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=_fc_init,
                               name="fc8")(x, as_conv=self.fully_conv)
        if self.fully_conv:
            self.sow("intermediates", "score_map", x)
            x = jnp.mean(x, axis=(1, 2))  # Sec. 3.2: spatial average of the class score map
        return x


def _vgg(cfg: str, batch_norm: bool, /, **kwargs) -> VGG:
    return VGG(**{"cfg": CONFIGS[cfg], "batch_norm": batch_norm, **kwargs})


@register_model
def vgg11(**kwargs) -> VGG:
    return _vgg("A", False, **kwargs)


@register_model
def vgg11_bn(**kwargs) -> VGG:
    return _vgg("A", True, **kwargs)


@register_model
def vgg11_lrn(**kwargs) -> VGG:
    return _vgg("A-LRN", False, **kwargs)


@register_model
def vgg13(**kwargs) -> VGG:
    return _vgg("B", False, **kwargs)


@register_model
def vgg13_bn(**kwargs) -> VGG:
    return _vgg("B", True, **kwargs)


@register_model
def vgg16(**kwargs) -> VGG:
    return _vgg("D", False, **kwargs)


@register_model
def vgg16_bn(**kwargs) -> VGG:
    return _vgg("D", True, **kwargs)


@register_model
def vgg16_c(**kwargs) -> VGG:
    return _vgg("C", False, **kwargs)


@register_model
def vgg19(**kwargs) -> VGG:
    return _vgg("E", False, **kwargs)


@register_model
def vgg19_bn(**kwargs) -> VGG:
    return _vgg("E", True, **kwargs)
