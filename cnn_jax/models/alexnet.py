"""AlexNet (Krizhevsky, Sutskever & Hinton 2012): torchvision's variant and the paper's network.

Both share one conv geometry (``_CONVS``) and differ only in data (``CONFIGS``): the paper's
96-256-384-384-256 filters, local response normalization after the first two convs and the
two-GPU split as grouped convolutions, against torchvision's single-tower 64-192-384-256-256.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers
from cnn_jax.models.registry import KeyMap, TorchvisionRef, register_model


class _ConvSpec(NamedTuple):
    name: str
    kernel: int
    stride: int
    padding: int
    tower_split: bool  # the paper's two GPUs do not exchange activations at this layer (groups)
    lrn: bool  # the paper normalizes this layer's responses (after the ReLU, before the pool)
    pool: bool  # a max pool follows


# The paper feeds 227x227 crops (it says 224) to an unpadded conv1; torchvision pads conv1 by 2 so a
# 224 input gives the same 55x55 map. Both variants use torchvision's padding.
_CONVS = (
    _ConvSpec("conv1", 11, 4, 2, tower_split=False, lrn=True, pool=True),
    _ConvSpec("conv2", 5, 1, 2, tower_split=True, lrn=True, pool=True),
    _ConvSpec("conv3", 3, 1, 1, tower_split=False, lrn=False, pool=False),  # sees both towers
    _ConvSpec("conv4", 3, 1, 1, tower_split=True, lrn=False, pool=False),
    _ConvSpec("conv5", 3, 1, 1, tower_split=True, lrn=False, pool=True),
)

CONFIGS: dict[str, dict[str, Any]] = {
    "alexnet": dict(widths=(64, 192, 384, 256, 256)),
    "alexnet_original": dict(widths=(96, 256, 384, 384, 256), use_lrn=True, groups=2),
}

# torchvision ``alexnet`` state_dict prefix -> submodule here (each holds ``kernel`` and ``bias``).
# Torch conv weights are [O, I, kh, kw] (here [kh, kw, I, O]); fc6 flattens torch's (C, H, W) =
# (256, 6, 6) where this module flattens NHWC (6, 6, 256), so its rows must be permuted.
TORCHVISION_NAMES = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}



def torchvision_keys(model: nn.Module) -> KeyMap:
    """Flax module path -> torchvision ``alexnet``'s state_dict prefix (cnn_jax.convert)."""
    del model  # both variants share the names
    inverse = {flax_name: torch_name for torch_name, flax_name in TORCHVISION_NAMES.items()}
    return lambda path: inverse.get(path[0]) if len(path) == 1 else None


INITS = ("torch", "paper")
# torch's default Conv2d/Linear weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in));
# biases start at zero here.
_torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Paper Sec. 5: N(0, 0.01) weights; bias 1 in conv2, conv4, conv5 and the hidden FC layers (to give
# the ReLUs positive inputs early on), 0 elsewhere.
_PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012); fields choose torchvision's layout or the paper's."""

    num_classes: int = 1000
    dtype: Any = jnp.float32
    widths: Tuple[int, ...] = CONFIGS["alexnet"]["widths"]
    fc_features: int = 4096
    overlapping_pool: bool = True  # paper Sec. 3.4: 3x3 windows at stride 2; False: 2x2 stride 2
    activation: str = "relu"  # paper Sec. 3.1 compares ReLU with tanh
    use_lrn: bool = False  # paper Sec. 3.3: k=2, n=5, alpha=1e-4, beta=0.75
    dropout_rate: float = 0.5
    groups: int = 1  # 2 = the paper's two-GPU towers (Sec. 3.2) on conv2, conv4, conv5
    weight_init: str = "torch"  # 'torch' (torch's default init) or 'paper' (Sec. 5)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.widths) != len(_CONVS):
            raise ValueError(f"AlexNet widths needs {len(_CONVS)} entries, got {self.widths}")
        if self.weight_init not in INITS:
            raise ValueError(f"unknown AlexNet weight_init {self.weight_init!r}; "
                             f"choose one of {INITS}")
        split_widths = [n for spec, n_in, n_out in zip(_CONVS, (3, *self.widths), self.widths)
                        if spec.tower_split for n in (n_in, n_out)]
        if any(n % self.groups for n in split_widths):
            raise ValueError(f"AlexNet groups={self.groups} must divide the widths {self.widths} "
                             f"of the split convs and their inputs; use groups=1 or 2")
        act = layers.get_activation(self.activation)
        window = 3 if self.overlapping_pool else 2
        in_hw = x.shape[1:3]

        def inits(name):
            if self.weight_init == "paper":
                bias = 1.0 if name in _PAPER_BIAS_ONE else 0.0
                return nn.initializers.normal(0.01), nn.initializers.constant(bias)
            return _torch_default_init, nn.initializers.zeros

        def check_fits(x, size):
            if min(x.shape[1:3]) < size:
                raise ValueError(f"AlexNet input {in_hw[0]}x{in_hw[1]} is too small: use images "
                                 f"of at least 63x63 pixels (224 is standard)")

        x = x.astype(self.dtype)
        for spec, width in zip(_CONVS, self.widths):
            kernel_init, bias_init = inits(spec.name)
            check_fits(x, spec.kernel - 2 * spec.padding)
            x = layers.Conv2d(width, (spec.kernel, spec.kernel), strides=(spec.stride, spec.stride),
                              padding=layers.torch_padding(spec.padding),
                              feature_group_count=self.groups if spec.tower_split else 1,
                              dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init,
                              name=spec.name)(x)
            x = act(x)
            if spec.lrn and self.use_lrn:
                x = layers.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0,
                                             name=f"lrn{spec.name[-1]}")(x)
            if spec.pool:
                check_fits(x, window)
                x = layers.max_pool(x, window, 2)
        self.sow("intermediates", "features", x)  # last conv map, before the adaptive pool
        x = layers.flatten(layers.adaptive_avg_pool(x, 6))

        # torchvision drops the inputs of fc6 and fc7 (Caffe's reference net drops their outputs).
        for name in ("fc6", "fc7"):
            kernel_init, bias_init = inits(name)
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{name[-1]}")(x)
            x = act(layers.Dense(self.fc_features, dtype=self.dtype, kernel_init=kernel_init,
                             bias_init=bias_init, name=name)(x))
        kernel_init, bias_init = inits("fc8")
        return layers.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                        bias_init=bias_init, name="fc8")(x)


# What every AlexNet entry shares: conv1 (11x11/4, pad 2) and the three 3x3/2 pools need 63 px.
_META = dict(family="alexnet", has_batch_norm=False, min_input_size=63, classifier=("fc8",),
             torchvision_keys=torchvision_keys, flatten_inputs={"fc6": (6, 6)},
             paper="Krizhevsky et al. 2012")


@register_model(**_META, torchvision=TorchvisionRef("alexnet", 56.522, 79.066, 0.714))
def alexnet(**kwargs) -> AlexNet:
    return AlexNet(**{**CONFIGS["alexnet"], **kwargs})


@register_model(**_META)
def alexnet_original(**kwargs) -> AlexNet:
    return AlexNet(**{**CONFIGS["alexnet_original"], **kwargs})
