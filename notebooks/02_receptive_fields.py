# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Receptive fields and parameter counts
#
# `cnn_jax.analysis.analyze(model, input_shape)` traces any Flax module (nothing is computed) and
# returns, per layer, the output shape, parameters, multiply-accumulates and the receptive field
# (size, jump, start; Araujo et al. 2019). `python -m cnn_jax.summary --arch=vgg16` prints the same
# for a registered model. This notebook uses it to check, as numbers, the design arguments of the
# papers: stacked 3x3 convolutions (VGG), 1x1 bottlenecks (Network in Network, GoogLeNet, ResNet),
# DenseNet's channel growth; and it compares every registered model.

# %%
from IPython.display import Markdown, display
from matplotlib.figure import Figure

from cnn_jax.notebook import setup, table

# The test suite runs every notebook with CNN_JAX_NOTEBOOK_SMOKE=1: the same cells, tiny sizes.
SMOKE = setup()

# %%
import flax.linen as nn

from cnn_jax import analysis, summary
from cnn_jax.models import create_model, layers


class Stack(nn.Module):
    """Convolutions applied in sequence, each (kernel, stride, out channels), no bias, ReLU."""

    convs: tuple

    @nn.compact
    def __call__(self, x):
        for i, (k, s, c) in enumerate(self.convs):
            x = nn.relu(nn.Conv(c, (k, k), strides=s, padding=layers.torch_padding(k // 2),
                                use_bias=False, name=f"conv{i + 1}")(x))
        return x


def describe(label, model, shape):
    a = analysis.analyze(model, shape)
    last = [r for r in a if r.kind == "conv"][-1]
    return (label, f"{a.totals.params:,}", f"{a.totals.macs:,}", last.rf_size[0],
            last.rf_jump[0], "x".join(map(str, last.output_shape[1:])))


HEADER = ("layers", "weights", "MACs", "receptive field", "jump", "output")

# %% [markdown]
# ## Stacks of 3x3 convolutions (Simonyan & Zisserman 2015, Sec. 2.3)
#
# Two stacked 3x3 convolutions see a 5x5 window and three see 7x7, with 2 x 9C² = 18C² and
# 27C² weights instead of 25C² and 49C², and one or two extra nonlinearities. With C = 64 channels
# on a 56x56 map:

# %%
C, shape = 64, (1, 56, 56, 64)
rows = [
    describe("one 5x5", Stack(((5, 1, C),)), shape),
    describe("two 3x3", Stack(((3, 1, C),) * 2), shape),
    describe("one 7x7", Stack(((7, 1, C),)), shape),
    describe("three 3x3", Stack(((3, 1, C),) * 3), shape),
]
assert rows[0][3] == rows[1][3] == 5 and rows[2][3] == rows[3][3] == 7
assert analysis.analyze(Stack(((3, 1, C),) * 2), shape).totals.params == 18 * C * C
assert analysis.analyze(Stack(((5, 1, C),)), shape).totals.params == 25 * C * C
table(HEADER, rows)

# %% [markdown]
# ## AlexNet's 11x11 stride-4 stem against 3x3 layers
#
# AlexNet's first layer (Krizhevsky et al. 2012) sees 11x11 windows at stride 4. Three 3x3 layers
# with strides 2, 1 and 2 cover the same 11x11 field with the same jump of 4 pixels, with three
# nonlinearities instead of one.

# %%
shape = (1, 224, 224, 3)
rows = [describe("11x11 / 4 (AlexNet conv1)", Stack(((11, 4, 96),)), shape),
        describe("3x3 / 2, 3x3 / 1, 3x3 / 2", Stack(((3, 2, 96), (3, 1, 96), (3, 2, 96))), shape)]
assert rows[0][3] == rows[1][3] == 11 and rows[0][4] == rows[1][4] == 4
table(HEADER, rows)

# %% [markdown]
# Here the stack is *not* cheaper: the 11x11 layer reads only the 3 input channels, so its 121 taps
# per output cost little, while the 3x3 layers read 96 channels, the first of them on a 112x112
# map. The 18C² < 25C² argument holds where a layer has as many input as output channels, deep in
# the network; in the stem, a stack of small filters buys depth (more nonlinearities) for the same
# field and stride, at a higher cost.

# %% [markdown]
# ## 1x1 bottlenecks (Lin et al. 2014; Szegedy et al. 2015, Sec. 4)
#
# A 3x3 convolution from 128 to 128 channels holds 3x3x128x128 = 147,456 weights. Reducing to 32
# channels with a 1x1 convolution first costs 128x32 + 3x3x32x128 = 40,960 weights, with the same
# input, output and receptive field.

# %%
shape = (1, 28, 28, 128)
rows = [describe("3x3, 128 -> 128", Stack(((3, 1, 128),)), shape),
        describe("1x1 128 -> 32, 3x3 32 -> 128", Stack(((1, 1, 32), (3, 1, 128))), shape)]
assert analysis.analyze(Stack(((3, 1, 128),)), shape).totals.params == 147_456
assert analysis.analyze(Stack(((1, 1, 32), (3, 1, 128))), shape).totals.params == 40_960
assert rows[0][3] == rows[1][3] == 3
table(HEADER, rows)

# %% [markdown]
# GoogLeNet's Inception modules put such reductions before every 3x3 and 5x5 branch. The rows of
# module `inception3a` of the registered `googlenet` (torchvision's layout, whose "5x5" branch is a
# 3x3; `googlenet_paper` has the true 5x5):

# %%
g = analysis.analyze(create_model("googlenet"), (1, 224, 224, 3))
rows = [(r.name, r.kind, "x".join(map(str, r.output_shape[1:])), f"{r.params:,}", f"{r.macs:,}",
         r.rf_size[0] if r.rf_size else "-")
        for r in g.select("inception3a/", kinds=("conv", "max_pool"))]
table(("layer", "kind", "output", "params", "MACs", "RF"), rows)

# %% [markdown]
# The branch widths of every Inception module (Szegedy et al. 2015, Table 1), read from the
# registered `googlenet`'s parameters: the 1x1, 3x3 and "5x5" branches and the pool projection,
# with the 1x1 reductions before the 3x3 and 5x5 branches. The 3x3 branch carries the most output
# channels throughout; the reductions make the wide 3x3 and 5x5 branches cheap, and the modules
# widen towards the output (256 channels in 3a, 1024 in 5b).

# %%
import numpy as np

from cnn_jax.models import abstract_variables

params = abstract_variables(create_model("googlenet"), 224)["params"]
modules = [k for k in params if k.startswith("inception")]
width = {m: {b: params[m][b]["conv"]["kernel"].shape[-1] for b in params[m]} for m in modules}
branches = [("branch1", "1x1"), ("branch2_1", "3x3"), ("branch3_1", "5x5 (3x3 here)"),
            ("branch4_1", "pool proj")]
table(("module", "1x1", "3x3 reduce", "3x3", "5x5 reduce", "5x5", "pool proj", "output"),
      [(m, width[m]["branch1"], width[m]["branch2_0"], width[m]["branch2_1"],
        width[m]["branch3_0"], width[m]["branch3_1"], width[m]["branch4_1"],
        sum(width[m][b] for b, _ in branches)) for m in modules])

# %%
assert [sum(width[m][b] for b, _ in branches) for m in ("inception3a", "inception5b")] == \
    [256, 1024]
fig = Figure(figsize=(9, 3.6))
ax = fig.add_subplot(1, 1, 1)
bottom = np.zeros(len(modules))
for b, label in branches:
    w = np.array([width[m][b] for m in modules])
    ax.bar(range(len(modules)), w, bottom=bottom, label=label)
    bottom += w
ax.set_xticks(range(len(modules)), [m.replace("inception", "") for m in modules])
ax.set_xlabel("Inception module")
ax.set_ylabel("output channels (stacked by branch)")
ax.set_title("GoogLeNet: branch widths of each Inception module")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, axis="y")
fig

# %% [markdown]
# ResNet's bottleneck block (He et al. 2016a, Fig. 5) does the same inside a residual block: on 256
# channels, 1x1 (256 -> 64), 3x3 (64 -> 64), 1x1 (64 -> 256) instead of two 3x3 convs of 256
# channels. The blocks are the library's own `Bottleneck` and `BasicBlock` modules:

# %%
from cnn_jax.models.resnet import BasicBlock, Bottleneck

shape = (1, 56, 56, 256)
rows = []
for label, block in (("two 3x3 (BasicBlock, 256)", BasicBlock(256)),
                     ("1x1-3x3-1x1 (Bottleneck, 64 x 4)", Bottleneck(64))):
    a = analysis.analyze(block, shape)
    convs = [r for r in a if r.kind == "conv"]
    rows.append((label, f"{sum(r.params for r in convs):,}", f"{a.totals.params:,}",
                 f"{a.totals.macs:,}", max(r.rf_size[0] for r in convs)))
table(("block", "conv weights", "all parameters (with BN)", "MACs", "receptive field"), rows)

# %% [markdown]
# ## DenseNet: channel growth and compression (Huang et al. 2017, Sec. 3)
#
# Inside a dense block every layer adds k = 32 feature maps to the concatenation it reads, so the
# channels entering the *l*-th layer grow as k0 + (l - 1) k; each transition's 1x1 convolution halves
# them (compression 0.5) and its 2x2 average pool halves the resolution.

# %%
d = analysis.analyze(create_model("densenet121"), (1, 224, 224, 3))
inputs = [r.in_features for r in d if r.kind == "conv" and r.name.endswith("conv1")
          and "denseblock" in r.name]
transitions = [(r.name.split("/")[0], r.in_features, r.out_features) for r in d
               if r.kind == "conv" and "transition" in r.name]
print("channels into the first five 1x1 convs of block 1:", inputs[:5])
assert inputs[:6] == [64 + 32 * i for i in range(6)]
for name, cin, cout in transitions:
    print(f"{name}: {cin} -> {cout} channels")
    assert cout == cin // 2

fig = Figure(figsize=(9, 3.2))
ax = fig.add_subplot(1, 1, 1)
ax.plot(range(1, len(inputs) + 1), inputs, "o-", ms=3)
ax.set_xlabel("dense layer (blocks of 6, 12, 24, 16)")
ax.set_ylabel("input channels")
ax.set_title("DenseNet-121: channels read by each dense layer (drops = transitions)")
ax.grid(alpha=0.3)
fig

# %% [markdown]
# ## How receptive fields grow with depth
#
# The receptive field of each convolution's output in VGG-16 (3x3 stacks, pooling every few layers)
# and ResNet-50 (7x7 stride-2 stem and pooling, then bottlenecks). Each 3x3 layer adds two jumps,
# each stride doubles the jump: VGG-16's last conv sees 196x196 pixels, ResNet-50's deepest
# layers more than the whole 224x224 image (427: fields count the padding, Araujo et al. 2019).

# %%
fig = Figure(figsize=(9, 3.6))
ax = fig.add_subplot(1, 1, 1)
for name in ("vgg16", "resnet50"):
    a = summary.analyze_registered(name)
    convs = [r for r in a if r.kind == "conv" and "downsample" not in r.name]
    ax.plot(range(1, len(convs) + 1), [r.rf_size[0] for r in convs], "o-", ms=2.5, label=name)
    print(f"{name}: {len(convs)} convs, the last ({convs[-1].name}) sees "
          f"{convs[-1].rf_size[0]:g}x{convs[-1].rf_size[1]:g} pixels")
ax.axhline(224, color="k", lw=0.8, ls="--", label="input (224)")
ax.set_xlabel("convolution (in program order)")
ax.set_ylabel("receptive field (pixels)")
ax.set_yscale("log")
ax.legend()
ax.grid(alpha=0.3, which="both")
fig

# %% [markdown]
# ## All registered models
#
# `summary.compare_models` analyses every registered model at its default input size (224x224,
# CIFAR networks 32x32): depth (longest chain of weight layers), parameters, MACs, and torchvision's
# published ImageNet top-1 where torchvision has weights for exactly that layout. In smoke mode only
# a few models are analysed.

# %%
names = ["alexnet", "vgg11", "resnet18", "resnet20", "densenet121"] if SMOKE else None
rows = summary.compare_models(names)
display(Markdown(summary.format_comparison(rows, "markdown")))
summary.plot_comparison(rows)
